package main

import (
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/attested-dev/attested/cmd/internal/nodeconfig"
)

// config is the node, pipeline and admin configuration (node.yaml); the
// lighter attested-keyprovider reads the same.
type config = nodeconfig.Config

// defaultConfig is read when --config is not given and the file exists.
const defaultConfig = nodeconfig.DefaultPath

func defaults() config { return nodeconfig.Defaults() }

func configFlags(fs *pflag.FlagSet, c *config) { nodeconfig.Flags(fs, c) }

func loadConfig(cmd *cobra.Command, c *config) error { return nodeconfig.Load(cmd.Flags(), c) }
