// Package nodeconfig is the configuration of a node, a pipeline and an
// admin's CLI (node.yaml): one file, every setting also a flag, flags win.
// Both the attested binary and the lighter attested-keyprovider read it.
package nodeconfig

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker/settings"
)

// DefaultPath is read when --config is not given and the file exists.
const DefaultPath = "/etc/attested/node.yaml"

// Config is the node, pipeline and admin configuration. Every field is also
// a flag; a flag given on the command line wins over the file.
type Config struct {
	Broker         string        `yaml:"broker"`
	BrokerCA       string        `yaml:"brokerCA"`
	AdminTokenFile string        `yaml:"adminTokenFile"`
	Name           string        `yaml:"name"`
	TPM            string        `yaml:"tpm"`
	StateDir       string        `yaml:"stateDir"`
	RunDir         string        `yaml:"runDir"`
	CacheDir       string        `yaml:"cacheDir"`
	Agent          string        `yaml:"agent"`
	Provider       string        `yaml:"provider"`
	Timeout        time.Duration `yaml:"timeout"`
	Reattest       time.Duration `yaml:"reattest"`
	EventLog       string        `yaml:"eventLog"`
	IMALog         string        `yaml:"imaLog"`
	MetricsListen  string        `yaml:"metricsListen"`

	// NameSet is whether the name was given (flag or file), rather than
	// taken from the host name.
	NameSet bool `yaml:"-"`
}

// Kernel locations of the logs a device TPM's node sends by default.
const (
	kernelEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"
	kernelIMALog   = "/sys/kernel/security/ima/binary_runtime_measurements"
)

// Logs returns the event logs to send: configured paths, or for a device
// TPM the kernel's logs when present. "none" sends none.
func (c *Config) Logs() attest.Logs {
	pick := func(configured, kernel string) string {
		switch {
		case configured == "none":
			return ""
		case configured != "":
			return configured
		case strings.HasPrefix(c.TPM, "/dev/"):
			if _, err := os.Stat(kernel); err == nil {
				return kernel
			}
		}
		return ""
	}
	return attest.Logs{Firmware: pick(c.EventLog, kernelEventLog), IMA: pick(c.IMALog, kernelIMALog)}
}

// Defaults are the settings before any file or flag.
func Defaults() Config {
	host, _ := os.Hostname()
	return Config{
		Name:     host,
		StateDir: "/var/lib/attested",
		RunDir:   "/run/attested",
		Provider: "attested",
		Timeout:  60 * time.Second,
		Reattest: 2 * time.Minute,
	}
}

// Flags registers every setting as a flag on fs.
func Flags(fs *pflag.FlagSet, c *Config) {
	fs.String("config", "", "configuration file (default "+DefaultPath+" if it exists; env ATTESTED_CONFIG)")
	fs.StringVar(&c.Broker, "broker", c.Broker, "broker address host:port")
	fs.StringVar(&c.BrokerCA, "broker-ca", c.BrokerCA, "broker CA certificate (PEM); the broker is trusted only through it")
	fs.StringVar(&c.AdminTokenFile, "admin-token-file", c.AdminTokenFile, "file holding the admin credential (admin commands)")
	fs.StringVar(&c.Name, "name", c.Name, "this node's name at the broker")
	fs.StringVar(&c.TPM, "tpm", c.TPM, "TPM: /dev/tpmrm0 | swtpm://HOST:PORT | simulator")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "node state directory (enrollment, 0700)")
	fs.StringVar(&c.RunDir, "run-dir", c.RunDir, "runtime directory for the session cache (tmpfs, 0700)")
	fs.StringVar(&c.CacheDir, "cache-dir", c.CacheDir, "public key cache for wrapping (default $XDG_CACHE_HOME/attested, ~/.cache/attested)")
	fs.StringVar(&c.Agent, "agent", c.Agent, "agent socket (unix:///run/attested/keyprovider.sock) that exec mode forwards to when it answers")
	fs.StringVar(&c.Provider, "provider", c.Provider, "provider name in the ocicrypt config")
	fs.DurationVar(&c.Timeout, "timeout", c.Timeout, "bound on one keyprovider request, TPM and broker calls included")
	fs.DurationVar(&c.Reattest, "reattest", c.Reattest, "agent re-attestation period")
	fs.StringVar(&c.EventLog, "event-log", c.EventLog, "firmware event log sent with quotes (default for /dev TPMs: "+kernelEventLog+"; 'none' to send none)")
	fs.StringVar(&c.MetricsListen, "metrics-listen", c.MetricsListen, "agent: serve Prometheus metrics on this address (e.g. 127.0.0.1:9465); off when empty")
	fs.StringVar(&c.IMALog, "ima-log", c.IMALog, "IMA measurement list sent with quotes (default for /dev TPMs: "+kernelIMALog+"; 'none' to send none)")
}

// Load fills c from the config file (--config, ATTESTED_CONFIG, or
// DefaultPath when it exists), then re-applies the flags of fs that were
// set explicitly, so they win.
func Load(fs *pflag.FlagSet, c *Config) error {
	c.NameSet = fs.Changed("name")
	path, _ := fs.GetString("config")
	explicit := path != ""
	if !explicit {
		path = os.Getenv("ATTESTED_CONFIG")
		explicit = path != ""
	}
	if !explicit {
		path = DefaultPath
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist) && !explicit:
		return nil
	case err != nil:
		return fmt.Errorf("config: %w", err)
	}
	changed := map[string]string{}
	slices := map[pflag.SliceValue][]string{}
	fs.Visit(func(f *pflag.Flag) {
		// A list flag's String() is "[a,b]", which Set would read as the
		// items "[a" and "b]": keep its items instead.
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			slices[sv] = append([]string(nil), sv.GetSlice()...)
			return
		}
		changed[f.Name] = f.Value.String()
	})
	if err := settings.Decode(path, data, c); err != nil && !errors.Is(err, settings.ErrEmpty) {
		return fmt.Errorf("config: %w", err)
	}
	for name, v := range changed {
		if err := fs.Set(name, v); err != nil {
			return err
		}
	}
	// A name in the file counts as given (one equal to the host name
	// changes nothing either way).
	c.NameSet = c.NameSet || c.Name != Defaults().Name
	for sv, items := range slices {
		if err := sv.Replace(items); err != nil {
			return err
		}
	}
	return nil
}
