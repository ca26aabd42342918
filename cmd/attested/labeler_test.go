package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// client-go's package initialisation (its API scheme: ~5 ms and ~2 MB of
// allocations here) would be paid by every exec-mode keyprovider call,
// one process per image layer: attested must not link it. The labeler is
// attested-labeler.
func TestAttestedDoesNotLinkClientGo(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	require.NoError(t, err)
	for _, pkg := range strings.Fields(string(out)) {
		assert.False(t, strings.HasPrefix(pkg, "k8s.io/") || strings.HasPrefix(pkg, "sigs.k8s.io/"),
			"attested links %s: keep Kubernetes packages in attested-labeler", pkg)
	}
}

func TestFindLabeler(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("PATH", dir)
	_, err := findLabeler()
	require.ErrorContains(t, err, "attested-labeler is not installed beside this binary or on PATH")

	bin := filepath.Join(dir, labelerBinary)
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755))
	got, err := findLabeler()
	require.NoError(t, err)
	assert.Equal(t, bin, got)
}
