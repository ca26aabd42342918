// Command attested-load runs many simulated nodes, each a real TPM
// (swtpm) enrolled under its own EK, against 'attested broker serve' from
// the built binary, for a bounded time, and prints the latency of each
// operation, the throughput, what the processes cost in memory and
// processor time, and whether anything went wrong: any error, or any key
// released to a node that fails policy, makes it exit 1.
//
// It is a binary of its own so that attested, which runs once per image
// layer in exec mode, links none of it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/store/pgstore"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
	"github.com/attested-dev/attested/test/load"
	"github.com/attested-dev/attested/test/swtpm"
)

type options struct {
	attested    string
	nodes       int
	failing     float64
	duration    time.Duration
	layers      int
	attestEvery int
	pause       time.Duration
	timeout     time.Duration
	parallel    int
	dir         string
	keep        bool
	jsonOut     string
	replicas    int
	store       string
}

func main() {
	var o options
	flag.StringVar(&o.attested, "attested", "", "the attested binary to run as the broker (default: attested next to this program, else on PATH)")
	flag.IntVar(&o.nodes, "nodes", 200, "simulated nodes, each its own swtpm process, enrolled and pulling at once")
	flag.Float64Var(&o.failing, "failing", 0.1, "fraction of the nodes that fail policy (PCR 16 extended): every key released to one is a failure")
	flag.DurationVar(&o.duration, "duration", 60*time.Second, "how long the nodes pull")
	flag.IntVar(&o.layers, "layers", 4, "layers per image; a pull unwraps them in parallel, as ocicrypt does")
	flag.IntVar(&o.attestEvery, "attest-every", 4, "each node attests afresh before every Nth pull (0: once, at start)")
	flag.DurationVar(&o.pause, "pause", 0, "each node's mean rest between pulls, drawn from 0.5x to 1.5x (0: pull again at once, the fleet saturates the machine)")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "deadline of each node operation (node.yaml: timeout)")
	flag.IntVar(&o.parallel, "parallel", 32, "TPMs manufactured and nodes enrolled at once during set-up")
	flag.StringVar(&o.dir, "dir", "", "working directory for the broker and the TPMs (default: a new temporary directory, removed at the end)")
	flag.BoolVar(&o.keep, "keep", false, "keep the working directory (broker log, TPM states)")
	flag.StringVar(&o.jsonOut, "json", "", "also write the results as JSON to this file")
	flag.IntVar(&o.replicas, "replicas", 1, "broker replicas; more than one share a PostgreSQL database behind a round-robin TCP proxy (one address), and each node attests and unwraps over two connections, often landing on different replicas")
	flag.StringVar(&o.store, "store", "", "the replicas' PostgreSQL database (postgres://...; its password in PGPASSFILE or PGPASSWORD, never in the URL); default with --replicas > 1: a throwaway cluster from Debian's postgresql server binaries")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `Usage: attested-load [flags]

Runs --nodes simulated nodes against 'attested broker serve' for --duration:
each node is its own swtpm, enrolled with a join token, and runs the node code
of attested (attestation sessions, keyprovider keyunwrap) in this process.
A fraction (--failing) has PCR 16 extended and must be refused every key.
Prints latency percentiles per operation, throughput, memory and processor use;
exits 1 on any error or any key released to a failing node.

With --replicas 2 the brokers share a PostgreSQL database behind one address.

Needs swtpm and swtpm_setup (make deps), and for replicas postgresql. Every node connects from 127.0.0.1,
so the broker's per-source limits are raised in its broker.yaml (printed).

Flags:
`)
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "attested-load:", err)
		os.Exit(1)
	}
}

func findAttested(flagValue string) (string, error) {
	if flagValue != "" {
		return filepath.Abs(flagValue)
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "attested")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("attested")
	if err != nil {
		return "", errors.New("no attested binary: build it (make build) and pass --attested bin/attested")
	}
	return p, nil
}

func run(o options, out io.Writer) error {
	if o.nodes < 1 || o.layers < 1 || o.duration <= 0 || o.failing < 0 || o.failing >= 1 {
		return errors.New("want --nodes >= 1, --layers >= 1, --duration > 0 and 0 <= --failing < 1")
	}
	failing := int(float64(o.nodes) * o.failing)
	if err := swtpm.CheckTools(); err != nil {
		return fmt.Errorf("%w: run 'make deps' (installs swtpm and swtpm-tools)", err)
	}
	bin, err := findAttested(o.attested)
	if err != nil {
		return err
	}
	dir := o.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "attested-load-"); err != nil {
			return err
		}
	}
	if !o.keep {
		defer os.RemoveAll(dir)
	} else {
		fmt.Fprintf(out, "working directory: %s\n", dir)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	say := func(format string, args ...any) { fmt.Fprintf(out, "- "+format+"\n", args...) }

	ca, err := swtpm.NewCA(filepath.Join(dir, "swtpm-ca"))
	if err != nil {
		return err
	}
	roots, err := ca.Roots()
	if err != nil {
		return err
	}
	lim := load.LoadLimits(o.nodes, o.layers)
	limYAML, err := load.LimitsYAML(lim, o.nodes)
	if err != nil {
		return err
	}
	settings := []string{limYAML, "metricsListen: \"off\"\n"}
	storeText := "embedded store"
	var env []string
	var pgPIDs func() []int
	if o.replicas > 1 || o.store != "" {
		url := o.store
		if url == "" {
			pg, err := pgtest.Start()
			if err != nil {
				return fmt.Errorf("PostgreSQL for the replicas: %w", err)
			}
			defer pg.Stop()
			db, err := pg.CreateDatabase(ctx)
			if err != nil {
				return err
			}
			passfile, err := pg.Passfile(dir)
			if err != nil {
				return err
			}
			url, env = pg.TCPURL(db), []string{"PGPASSFILE=" + passfile}
			pgPIDs = func() []int { return postgresPIDs(pg.Dir) }
			storeText = "a throwaway PostgreSQL cluster (" + pg.String() + ")"
		} else {
			storeText = "PostgreSQL " + pgstore.Redact(url)
		}
		settings = append(settings, "store: "+url+"\n")
	}
	b, err := load.InitBroker(bin, dir, roots, settings...)
	if err != nil {
		return err
	}
	b.Env = env
	brokers := []*load.Broker{b}
	for i := 1; i < o.replicas; i++ {
		r, err := b.Replica(dir, fmt.Sprintf("broker-%d", i+1))
		if err != nil {
			return err
		}
		brokers = append(brokers, r)
	}
	var addrs []string
	for _, r := range brokers {
		if err := r.Start(); err != nil {
			return err
		}
		defer r.Stop()
		addrs = append(addrs, r.Addr)
	}
	addr := b.Addr
	if len(brokers) > 1 {
		proxy, err := load.NewProxy(addrs...)
		if err != nil {
			return err
		}
		defer proxy.Close()
		addr = proxy.Addr()
		say("%d broker replicas %s (%s) on %s behind a round-robin TCP proxy on %s; store: %s", len(brokers), b.ID, bin, strings.Join(addrs, ", "), addr, storeText)
	} else {
		say("broker %s (%s) on %s, %s", b.ID, bin, b.Addr, storeText)
	}
	say("every node connects from 127.0.0.1, so broker.yaml raises the limits per source: %s", load.LimitsText(lim, o.nodes))
	cc, err := conn.Dial(conn.Options{Addr: addr, CAFile: b.CAFile, AdminTokenFile: b.AdminTokenFile, Timeout: o.timeout})
	if err != nil {
		return err
	}
	defer cc.Close()
	admin := apiv1.NewAdminClient(cc)

	fleet, err := load.NewFleet(ctx, load.FleetOptions{Dir: dir, CA: ca, Nodes: o.nodes, Failing: failing,
		Addrs: []string{addr}, CAFile: b.CAFile, BrokerID: b.ID, Admin: admin, Timeout: o.timeout,
		Parallel: o.parallel, Progress: say, SplitConns: len(brokers) > 1})
	if err != nil {
		return err
	}
	defer fleet.Close()
	good := fleet.Nodes[len(fleet.Nodes)-1] // the failing nodes come first
	pcrs := map[int][]byte{}
	for _, i := range []int{0, load.FailingPCR} {
		if pcrs[i], err = good.TPM.PCR(i); err != nil {
			return err
		}
	}
	img, err := load.Setup(ctx, admin, cc, b.CAFile, addr, "load", pcrs, o.layers)
	if err != nil {
		return err
	}
	say("policy load pins PCRs 0 and %d; key load wraps a %d-layer image; %d of %d nodes fail the policy", load.FailingPCR, o.layers, failing, o.nodes)
	say("pulling for %s: each node pulls%s, attesting afresh %s", o.duration, pauseText(o.pause), attestText(o.attestEvery))

	var brokerPIDs []int
	for _, r := range brokers {
		brokerPIDs = append(brokerPIDs, r.PID())
	}
	groups := map[string][]int{"broker": brokerPIDs, "swtpm": fleet.TPMPIDs(), "load generator": {os.Getpid()}}
	if pgPIDs != nil {
		groups["postgres"] = pgPIDs()
	}
	usage := load.StartUsage(groups)
	stop := make(chan struct{})
	timer := time.AfterFunc(o.duration, func() { close(stop) })
	go func() {
		<-ctx.Done()
		if timer.Stop() {
			close(stop)
		}
	}()
	res := fleet.Run(stop, load.Workload{Image: img, AttestEvery: o.attestEvery, Pause: o.pause, Timeout: o.timeout})
	cores, machine, cpus := usage.Cores()
	var brokerMem []load.ProcMem
	for _, r := range brokers {
		brokerMem = append(brokerMem, load.Mem(r.PID()))
	}
	var pgPSS int64
	if pgPIDs != nil {
		for _, p := range pgPIDs() {
			pgPSS += load.Mem(p).PSS
		}
	}
	var tpmPSS, tpmRSS int64
	pids := fleet.TPMPIDs()
	for _, p := range pids {
		m := load.Mem(p)
		tpmPSS += m.PSS
		tpmRSS += m.RSS
	}
	self := load.Mem(os.Getpid())

	actx, acancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer acancel()
	audited, err := load.AuditReleases(actx, admin)
	if err != nil {
		return err
	}
	failingNodes := map[string]bool{}
	for _, n := range fleet.Nodes {
		failingNodes[n.Name] = n.Failing
	}
	auditProblems := load.CheckAudit(res.Releases, audited, failingNodes)
	totalSeen, totalAudited := 0, 0
	for _, n := range res.Releases {
		totalSeen += n
	}
	for _, n := range audited {
		totalAudited += n
	}

	where := "one broker, embedded store"
	if len(brokers) > 1 {
		where = fmt.Sprintf("%d broker replicas on PostgreSQL behind one address", len(brokers))
	} else if pgPIDs != nil || o.store != "" {
		where = "one broker on PostgreSQL"
	}
	fmt.Fprintf(out, "\nattested-load: %d nodes (%d failing policy), %d layers per pull, %s, %s\n\n", o.nodes, failing, o.layers, res.Elapsed.Round(time.Millisecond), where)
	load.WriteTable(out, res.Stats)
	fmt.Fprintf(out, "\npulls %d; layer keys released %d (%.1f/s); refusals of failing nodes %d (%.1f/s)\n",
		res.Pulls, totalSeen, float64(totalSeen)/res.Elapsed.Seconds(), res.Refusals, float64(res.Refusals)/res.Elapsed.Seconds())
	fmt.Fprintf(out, "audit: %d release records for the %d releases nodes received\n", totalAudited, totalSeen)
	var mems []string
	for i, m := range brokerMem {
		name := ""
		if len(brokerMem) > 1 {
			name = fmt.Sprintf("replica %d ", i+1)
		}
		mems = append(mems, fmt.Sprintf("%sRSS %s (peak %s)", name, load.MiB(m.RSS), load.MiB(m.HWM)))
	}
	fmt.Fprintf(out, "memory: broker %s; swtpm %d processes, PSS %s in all (%s each, RSS %s each); load generator RSS %s",
		strings.Join(mems, ", "), len(pids), load.MiB(tpmPSS), load.MiB(tpmPSS/int64(max(len(pids), 1))),
		load.MiB(tpmRSS/int64(max(len(pids), 1))), load.MiB(self.RSS))
	if pgPIDs != nil {
		fmt.Fprintf(out, "; postgres PSS %s", load.MiB(pgPSS))
	}
	fmt.Fprintln(out)
	var busy float64
	fmt.Fprintf(out, "processors busy (of %d):", cpus)
	for _, g := range []string{"broker", "postgres", "swtpm", "load generator"} {
		if c, ok := cores[g]; ok {
			busy += c
			fmt.Fprintf(out, " %s %.2f,", g, c)
		}
	}
	fmt.Fprintf(out, " everything else on the machine %.2f\n", max(0, machine-busy))
	fmt.Fprintf(out, "errors: %d; keys released to failing nodes: %d; audit problems: %d\n", res.ErrorCount, res.WrongReleases, len(auditProblems))
	for i, e := range load.SortedErrors(res.Errors) {
		if i == 20 {
			fmt.Fprintf(out, "  ... and %d more kinds\n", len(res.Errors)-20)
			break
		}
		fmt.Fprintln(out, "  "+e)
	}
	for _, p := range auditProblems {
		fmt.Fprintln(out, "  audit: "+p)
	}
	if o.jsonOut != "" {
		data, err := json.MarshalIndent(map[string]any{
			"nodes": o.nodes, "failing": failing, "layers": o.layers, "attestEvery": o.attestEvery, "elapsedSeconds": res.Elapsed.Seconds(),
			"stats": res.Stats, "pulls": res.Pulls, "releases": totalSeen, "auditedReleases": totalAudited, "refusals": res.Refusals,
			"errors": res.Errors, "wrongReleases": res.WrongReleases, "auditProblems": auditProblems,
			"replicas": len(brokers), "brokerMemory": brokerMem, "postgresPSS": pgPSS, "swtpmPSS": tpmPSS, "swtpmRSS": tpmRSS, "loadRSS": self.RSS,
			"cores": cores, "machineCores": machine, "cpus": cpus,
		}, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(o.jsonOut, data, 0o644); err != nil {
			return err
		}
	}
	for _, r := range brokers {
		if !r.Running() {
			return fmt.Errorf("broker %s exited during the run (%s); its log: %s", r.Addr, r.ExitState(), r.Log)
		}
	}
	if res.ErrorCount > 0 || res.WrongReleases > 0 || len(auditProblems) > 0 {
		return fmt.Errorf("FAILED: %d errors, %d keys released to failing nodes, %d audit problems", res.ErrorCount, res.WrongReleases, len(auditProblems))
	}
	if totalSeen == 0 {
		return errors.New("FAILED: no layer key was released")
	}
	return nil
}

// postgresPIDs are the cluster's server processes: the postmaster (its
// pid file's first line) and its children.
func postgresPIDs(clusterDir string) []int {
	b, err := os.ReadFile(filepath.Join(clusterDir, "data", "postmaster.pid"))
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		return nil
	}
	return append([]int{pid}, load.Children(pid)...)
}

func pauseText(d time.Duration) string {
	if d == 0 {
		return " again at once"
	}
	return fmt.Sprintf(" after a pause of %s on average", d)
}

func attestText(n int) string {
	if n == 0 {
		return "only before its first pull"
	}
	return fmt.Sprintf("before every %s pull", ordinal(n))
}

func ordinal(n int) string {
	switch n {
	case 1:
		return "1st"
	case 2:
		return "2nd"
	case 3:
		return "3rd"
	}
	return fmt.Sprintf("%dth", n)
}
