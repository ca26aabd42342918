//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/attested-dev/attested/test/swtpm"
)

// shared is what every test shares: the binaries, a source image and the
// swtpm certificate authority. Everything else is per test.
var shared struct {
	dir      string
	attested string
	// keyprovider is attested-keyprovider, which exec mode runs.
	keyprovider string
	imgcopy     string
	// srcImage is an OCI layout with srcLayers plaintext layers.
	srcImage   string
	srcDiffIDs []string
	ca         *swtpm.CA
}

const srcLayers = 4

func TestMain(m *testing.M) {
	if err := setupSuite(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if shared.dir != "" {
			os.RemoveAll(shared.dir)
		}
		os.Exit(1)
	}
	code := m.Run()
	if shared.dir != "" && os.Getenv("E2E_KEEP") == "" {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

func setupSuite() error {
	var missing []string
	for _, p := range append([]string{"docker-registry"}, swtpm.Tools...) {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%v not found in PATH: run 'make deps' (installs swtpm, swtpm-tools and docker-registry)", missing)
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "attested")); err != nil {
		return fmt.Errorf("run from test/e2e in the repository: %w", err)
	}
	shared.dir, err = os.MkdirTemp("", "attested-e2e-")
	if err != nil {
		return err
	}
	shared.attested = os.Getenv("ATTESTED_BIN")
	shared.keyprovider = os.Getenv("KEYPROVIDER_BIN")
	shared.imgcopy = os.Getenv("IMGCOPY_BIN")
	var wg sync.WaitGroup
	errs := make([]error, 3)
	if shared.attested == "" {
		shared.attested = filepath.Join(shared.dir, "attested")
		wg.Go(func() { errs[0] = goBuild(root, nil, "-o", shared.attested, "./cmd/attested") })
	}
	if shared.keyprovider == "" {
		shared.keyprovider = filepath.Join(shared.dir, "attested-keyprovider")
		wg.Go(func() { errs[2] = goBuild(root, nil, "-o", shared.keyprovider, "./cmd/attested-keyprovider") })
	}
	if shared.imgcopy == "" {
		shared.imgcopy = filepath.Join(shared.dir, "imgcopy")
		wg.Go(func() {
			errs[1] = goBuild(filepath.Join(root, "test", "imgcopy"), []string{"CGO_ENABLED=0"},
				"-tags", "containers_image_openpgp", "-o", shared.imgcopy, ".")
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, p := range []*string{&shared.attested, &shared.keyprovider, &shared.imgcopy} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
		if _, err := os.Stat(*p); err != nil {
			return err
		}
	}
	shared.ca, err = swtpm.NewCA(filepath.Join(shared.dir, "swtpm-ca"))
	if err != nil {
		return err
	}
	shared.srcImage = filepath.Join(shared.dir, "src")
	out, err := exec.Command(shared.imgcopy, "mkimage", "--layers", fmt.Sprint(srcLayers), "--size", "65536", "--out", shared.srcImage).Output()
	if err != nil {
		return fmt.Errorf("imgcopy mkimage: %w", err)
	}
	var mk struct {
		DiffIDs []string `json:"diffIDs"`
	}
	if err := json.Unmarshal(out, &mk); err != nil || len(mk.DiffIDs) != srcLayers {
		return fmt.Errorf("imgcopy mkimage printed %q (%v)", out, err)
	}
	shared.srcDiffIDs = mk.DiffIDs
	return nil
}

func goBuild(dir string, env []string, args ...string) error {
	start := time.Now()
	cmd := exec.Command("go", append([]string{"build"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build %v in %s: %v\n%s", args, dir, err, out)
	}
	fmt.Fprintf(os.Stderr, "e2e: built %s in %s\n", args[len(args)-2], time.Since(start).Round(time.Second))
	return nil
}
