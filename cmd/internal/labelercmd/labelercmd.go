// Package labelercmd is the command line of the Kubernetes labeler. It
// lives apart from cmd/attested because client-go's package
// initialisation (its API scheme) would cost every exec-mode keyprovider
// call, one process per image layer, several milliseconds: the labeler is
// its own binary, attested-labeler, and 'attested labeler' runs it.
package labelercmd

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/labeler"
)

// Name is the labeler's binary.
const Name = "attested-labeler"

// New returns the labeler's command.
func New() *cobra.Command {
	lc := labeler.Config{}
	var kubeconfig, broker, brokerCA, adminTokenFile string
	var once bool
	cmd := &cobra.Command{
		Use:   Name,
		Short: "Keep Kubernetes Node labels in step with the broker's trust status (admin credential)",
		Long: `Keep Kubernetes Node labels in step with what the broker knows of each node:

  attested.dev/trusted=true     the broker's status for the node is "trusted"
  attested.dev/trusted=false    any other status (untrusted, stale, revoked,
                                pending), a node the broker does not know, or
                                the broker unreachable for longer than --grace
  attested.dev/TAG=VALUE        each tag the node's TPM certified, on trusted
                                nodes only (region=EU: attested.dev/region=EU)

A broker node labels the Kubernetes Node of the same name. Labels under
attested.dev/ are the labeler's: others' changes to them are undone as soon as
they are seen; no other label is touched. A tag named "trusted", or one that
makes no valid label (a second '/', a value with spaces or over 63
characters), makes no label and is logged.

A failed poll of the broker changes nothing while the last good one is
younger than --grace; past it every node is attested.dev/trusted=false until
the broker answers again.

The broker is read with the admin credential (--admin-token-file); the
Kubernetes API with the pod's service account (in a cluster) or --kubeconfig.
It needs get, list, watch and patch on nodes, nothing else.

'attested labeler ARGS' runs this binary (` + Name + ` beside attested, or on
PATH) with the same arguments.`,
		Example: `  # In the cluster (examples/kubernetes/labeler.yaml):
  attested-labeler --broker attested-broker.attested.svc:8443 --broker-ca /etc/attested/ca.pem \
      --admin-token-file /var/run/attested-admin/token
  # From an admin machine, once, with kubectl's credentials:
  attested labeler --once --kubeconfig ~/.kube/config --broker localhost:8443 \
      --broker-ca ./broker/ca.pem --admin-token-file ~/attested-admin.token`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if adminTokenFile == "" {
				return errors.New("the broker's node status needs the admin credential: --admin-token-file")
			}
			restCfg, err := kubeConfig(kubeconfig)
			if err != nil {
				return err
			}
			restCfg.UserAgent = Name
			kube, err := corev1client.NewForConfig(restCfg)
			if err != nil {
				return fmt.Errorf("kubernetes client: %w", err)
			}
			cc, err := conn.Dial(conn.Options{Addr: broker, CAFile: brokerCA, AdminTokenFile: adminTokenFile, Timeout: lc.Timeout})
			if err != nil {
				return err
			}
			defer cc.Close()
			lc.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			l, err := labeler.New(apiv1.NewAdminClient(cc), kube.Nodes(), lc)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if once {
				return l.Step(ctx)
			}
			lc.Log.Info("labeler started", "broker", broker, "interval", lc.Interval.String(), "grace", lc.Grace.String())
			return l.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&broker, "broker", "", "broker address host:port")
	f.StringVar(&brokerCA, "broker-ca", "", "broker CA certificate (PEM); the broker is trusted only through it")
	f.StringVar(&adminTokenFile, "admin-token-file", "", "file holding the broker's admin credential")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
	f.DurationVar(&lc.Interval, "interval", labeler.DefaultInterval, "how often the broker is asked for node status")
	f.DurationVar(&lc.Grace, "grace", labeler.DefaultGrace, "how long the broker may be unreachable before every node is labelled attested.dev/trusted=false")
	f.DurationVar(&lc.Timeout, "call-timeout", labeler.DefaultTimeout, "deadline of each broker and Kubernetes API call")
	f.BoolVar(&once, "once", false, "poll once, label every node, and exit (non-zero if the broker or a node failed)")
	cmd.MarkFlagRequired("broker")
	cmd.MarkFlagRequired("broker-ca")
	return cmd
}

// kubeConfig is the in-cluster configuration, unless a kubeconfig is named
// (or the process runs outside a cluster).
func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err == nil {
			return cfg, nil
		}
		if !errors.Is(err, rest.ErrNotInCluster) {
			return nil, fmt.Errorf("in-cluster Kubernetes configuration: %w", err)
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes configuration: %w", err)
	}
	return cfg, nil
}
