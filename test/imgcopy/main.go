// Command imgcopy is a small test driver around the containers/image copy
// engine (go.podman.io/image/v5). Its "copy" subcommand sets up encryption
// and decryption the way upstream skopeo's "copy" command does, so end-to-end
// tests can exercise ocicrypt keyproviders without a skopeo binary.
//
// Usage:
//
//	imgcopy mkimage --layers N --out DIR [--tag TAG] [--size BYTES] [--seed S]
//	imgcopy copy [--encryption-key K]... [--decryption-key K]... [--encrypt-layer N]...
//	             [--src-tls-verify=false] [--dest-tls-verify=false] [--quiet] SRC DST
//	imgcopy inspect [--tls-verify=false] REF
//
// References are containers-transports(5) names; only the "docker" and "oci"
// transports are linked in (e.g. oci:/path:tag, docker://127.0.0.1:5000/app:1).
//
// Build with: CGO_ENABLED=0 go build -tags containers_image_openpgp .
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	encconfig "github.com/containers/ocicrypt/config"
	enchelpers "github.com/containers/ocicrypt/helpers"
	"go.podman.io/image/v5/copy"
	_ "go.podman.io/image/v5/docker" // registers the docker:// transport
	"go.podman.io/image/v5/image"
	"go.podman.io/image/v5/manifest"
	_ "go.podman.io/image/v5/oci/layout" // registers the oci: transport
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/transports"
	"go.podman.io/image/v5/types"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  imgcopy mkimage --layers N --out DIR [--tag TAG] [--size BYTES] [--seed S]
  imgcopy copy [--encryption-key K]... [--decryption-key K]... [--encrypt-layer N]... [--src-tls-verify=false] [--dest-tls-verify=false] [--quiet] SRC DST
  imgcopy inspect [--tls-verify=false] REF`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "mkimage":
		err = cmdMkimage(os.Args[2:])
	case "copy":
		err = cmdCopy(os.Args[2:])
	case "inspect":
		err = cmdInspect(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "imgcopy:", err)
		os.Exit(1)
	}
}

// sliceFlag is a repeatable string flag. Like skopeo's StringSliceVar, each
// value is also split on commas.
type sliceFlag []string

func (s *sliceFlag) String() string { return strings.Join(*s, ",") }
func (s *sliceFlag) Set(v string) error {
	*s = append(*s, strings.Split(v, ",")...)
	return nil
}

// intSliceFlag is a repeatable int flag, comma-splitting like skopeo's IntSliceVar.
type intSliceFlag []int

func (s *intSliceFlag) String() string { return fmt.Sprint([]int(*s)) }
func (s *intSliceFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil {
			return err
		}
		*s = append(*s, n)
	}
	return nil
}

// parseImageName mirrors alltransports.ParseImageName without linking in every
// transport (containers-storage, docker-daemon, ...).
func parseImageName(name string) (types.ImageReference, error) {
	tn, within, ok := strings.Cut(name, ":")
	if !ok {
		return nil, fmt.Errorf("invalid image name %q, expected colon-separated transport:reference", name)
	}
	t := transports.Get(tn)
	if t == nil {
		return nil, fmt.Errorf("invalid image name %q, unknown transport %q", name, tn)
	}
	return t.ParseReference(within)
}

func sysContext(tlsVerify bool) *types.SystemContext {
	sc := &types.SystemContext{}
	if !tlsVerify {
		// Also allows falling back to plain HTTP, as skopeo --tls-verify=false does.
		sc.DockerInsecureSkipTLSVerify = types.OptionalBoolTrue
		sc.OCIInsecureSkipTLSVerify = true
	}
	return sc
}

func cmdCopy(args []string) error {
	fs := flag.NewFlagSet("copy", flag.ExitOnError)
	var encKeys, decKeys sliceFlag
	var encLayers intSliceFlag
	fs.Var(&encKeys, "encryption-key", "key with the encryption protocol to use (e.g. jwe:pub.pem, provider:NAME:PARAMS); repeatable")
	fs.Var(&decKeys, "decryption-key", "key to decrypt with (e.g. priv.pem, provider:NAME:PARAMS); repeatable")
	fs.Var(&encLayers, "encrypt-layer", "0-based layer index to encrypt, negative counts from the top; repeatable; default all")
	srcTLS := fs.Bool("src-tls-verify", true, "require HTTPS and verify certificates when talking to the source registry")
	destTLS := fs.Bool("dest-tls-verify", true, "require HTTPS and verify certificates when talking to the destination registry")
	quiet := fs.Bool("quiet", false, "suppress progress output (otherwise written to stderr)")
	fs.Parse(args)
	if fs.NArg() != 2 {
		return errors.New("copy: exactly two arguments expected: SRC DST")
	}

	// Same checks and config construction as skopeo's cmd/skopeo/copy.go.
	if len(encKeys) > 0 && len(decKeys) > 0 {
		return errors.New("--encryption-key and --decryption-key cannot be specified together")
	}
	if len(encLayers) > 0 && len(encKeys) == 0 {
		return errors.New("--encrypt-layer can only be used with --encryption-key")
	}
	var (
		encConfig *encconfig.EncryptConfig
		decConfig *encconfig.DecryptConfig
		layers    *[]int
	)
	if len(encKeys) > 0 {
		l := []int(encLayers)
		if l == nil {
			l = []int{} // empty slice = all layers
		}
		layers = &l
		ecc, err := enchelpers.CreateCryptoConfig(encKeys, []string{})
		if err != nil {
			return fmt.Errorf("invalid encryption keys: %w", err)
		}
		cc := encconfig.CombineCryptoConfigs([]encconfig.CryptoConfig{ecc})
		encConfig = cc.EncryptConfig
	}
	if len(decKeys) > 0 {
		dcc, err := enchelpers.CreateCryptoConfig([]string{}, decKeys)
		if err != nil {
			return fmt.Errorf("invalid decryption keys: %w", err)
		}
		cc := encconfig.CombineCryptoConfigs([]encconfig.CryptoConfig{dcc})
		decConfig = cc.DecryptConfig
	}

	srcRef, err := parseImageName(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("invalid source name %s: %w", fs.Arg(0), err)
	}
	destRef, err := parseImageName(fs.Arg(1))
	if err != nil {
		return fmt.Errorf("invalid destination name %s: %w", fs.Arg(1), err)
	}

	policy := &signature.Policy{Default: []signature.PolicyRequirement{signature.NewPRInsecureAcceptAnything()}}
	pc, err := signature.NewPolicyContext(policy)
	if err != nil {
		return err
	}
	defer pc.Destroy()

	var report io.Writer = os.Stderr
	if *quiet {
		report = nil
	}
	_, err = copy.Image(context.Background(), pc, destRef, srcRef, &copy.Options{
		ReportWriter:     report,
		SourceCtx:        sysContext(*srcTLS),
		DestinationCtx:   sysContext(*destTLS),
		OciEncryptConfig: encConfig,
		OciEncryptLayers: layers,
		OciDecryptConfig: decConfig,
	})
	return err
}

type layerOut struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type inspectOut struct {
	ManifestMediaType string     `json:"manifestMediaType"`
	ManifestDigest    string     `json:"manifestDigest"`
	Layers            []layerOut `json:"layers"`
	DiffIDs           []string   `json:"diffIDs"`
}

func cmdInspect(args []string) error {
	fs := flag.NewFlagSet("inspect", flag.ExitOnError)
	tls := fs.Bool("tls-verify", true, "require HTTPS and verify certificates when talking to the registry")
	fs.Parse(args)
	if fs.NArg() != 1 {
		return errors.New("inspect: exactly one argument expected: REF")
	}
	ref, err := parseImageName(fs.Arg(0))
	if err != nil {
		return err
	}
	ctx := context.Background()
	sys := sysContext(*tls)
	src, err := ref.NewImageSource(ctx, sys)
	if err != nil {
		return err
	}
	defer src.Close()
	// FromSource resolves a manifest list to the instance for this platform.
	img, err := image.FromSource(ctx, sys, src)
	if err != nil {
		return err
	}
	defer img.Close()
	raw, mt, err := img.Manifest(ctx)
	if err != nil {
		return err
	}
	var m struct {
		Layers []layerOut `json:"layers"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("parsing manifest: %w", err)
	}
	cfg, err := img.OCIConfig(ctx)
	if err != nil {
		return fmt.Errorf("reading config: %w", err)
	}
	md, err := manifest.Digest(raw)
	if err != nil {
		return err
	}
	out := inspectOut{ManifestMediaType: mt, ManifestDigest: md.String(), Layers: m.Layers, DiffIDs: []string{}}
	if out.Layers == nil {
		out.Layers = []layerOut{}
	}
	for _, d := range cfg.RootFS.DiffIDs {
		out.DiffIDs = append(out.DiffIDs, d.String())
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}
