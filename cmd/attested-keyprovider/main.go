// Command attested-keyprovider is attested's exec-mode ocicrypt keyprovider
// alone: the same code as 'attested keyprovider' (package execmode), in a
// binary that links nothing else (no broker, policy engine, metrics or CLI
// framework), so the process ocicrypt starts for every layer starts fast.
//
//	{"key-providers":{"attested":{"cmd":{"path":"/usr/local/bin/attested-keyprovider","args":["--config","/etc/attested/node.yaml"]}}}}
package main

import (
	"fmt"
	"os"

	"github.com/spf13/pflag"

	"github.com/attested-dev/attested/cmd/internal/buildinfo"
	"github.com/attested-dev/attested/cmd/internal/execmode"
	"github.com/attested-dev/attested/cmd/internal/nodeconfig"
)

func main() {
	c := nodeconfig.Defaults()
	fs := execmode.Flags(&c)
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "attested-keyprovider: ocicrypt keyprovider, exec mode: one JSON request on stdin, one reply on stdout.")
		fmt.Fprintln(os.Stderr, "Settings as for 'attested keyprovider' (node.yaml, --config, ATTESTED_CONFIG):")
		fs.PrintDefaults()
	}
	err := fs.Parse(os.Args[1:])
	if err == pflag.ErrHelp {
		return
	}
	if err == nil && *showVersion {
		fmt.Println(buildinfo.String("attested-keyprovider"))
		return
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err == nil {
		err = nodeconfig.Load(fs, &c)
	}
	if err == nil {
		err = execmode.Run(&c, os.Stdin, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "attested:", execmode.PlainError(err))
		os.Exit(1)
	}
}
