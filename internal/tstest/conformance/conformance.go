// Package conformance runs the Kubernetes project's own networking tests
// against tulle: the upstream e2e binary (test/e2e, v1.34, built by
// tools/setup from tools/e2e with only the sig-network suites) under the
// ginkgo CLI, against a real cluster (internal/kubecluster) whose control
// plane is a tulle node too, with cluster DNS, tulle installed by
// `kubectl apply -k` for one backend. It reads the JUnit report the
// framework writes and says, per suite, what passed, failed and skipped.
//
// It owns the cluster it starts (Close removes it) and the output
// directory it is given; it never changes the tests, only which run.
package conformance

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tulle-net/tulle/internal/tstest/kubecluster"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
)

// Suite is a selection of upstream specs, by ginkgo focus.
type Suite struct {
	// Name names the suite in output directories and summary lines.
	Name string
	// Focus is the ginkgo --focus regular expression.
	Focus string
	// Skip is the ginkgo --skip expression for specs this machine
	// cannot run (each with Why), or "".
	Skip, Why string
}

// Suites are what `make conformance` runs, in order.
var Suites = []Suite{
	{Name: "sig-network-conformance", Focus: `\[sig-network\].*\[Conformance\]`},
	{Name: "netpol", Focus: `\[sig-network\] Netpol`},
}

// NetpolCI is the part of the Netpol suite CI runs beside the
// conformance specs (the whole suite takes some 40 minutes on two cores,
// `make conformance` runs it): the API specs, and dataplane specs that
// between them cover pod and namespace selectors together, default deny,
// egress denied at the client, UDP ports, a pod's label changing, ipBlock,
// named ports and TCP ports.
var NetpolCI = Suite{Name: "netpol-ci", Focus: `\[sig-network\] Netpol (API should support creating NetworkPolicy API|NetworkPolicy between server and client (should enforce policy based on PodSelector and NamespaceSelector|should support a 'default-deny-all' policy|should support denying of egress traffic on the client side|should allow ingress access from updated pod|should allow egress access to server in CIDR block|should allow ingress access from namespace on one named port|should enforce policy based on Ports|should deny ingress from pods on other namespaces)|\[LinuxOnly\] NetworkPolicy between server and client using UDP should enforce policy based on Ports)`}

// SuiteByName returns the suite called name (or the first whose name
// starts with name + "-": "conformance" is sig-network-conformance).
func SuiteByName(name string) (Suite, bool) {
	for _, s := range Suites {
		if s.Name == name || strings.HasSuffix(s.Name, "-"+name) {
			return s, true
		}
	}
	return Suite{}, false
}

// ForMachine adds to s the specs this kernel cannot run: SCTP ones
// without SCTP in the kernel.
func (s Suite) ForMachine() Suite {
	if !haveSCTP() {
		// The specs that need SCTP carry the feature tag; two Netpol
		// specs only name SCTP in a policy and run over TCP: those stay.
		s.Skip, s.Why = `\[Feature:SCTPConnectivity\]`, "the kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails)"
	}
	return s
}

func haveSCTP() bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

// Backends are the net-conf Backend objects the runs choose from.
var Backends = map[string]string{
	"udp":       `{"Type":"udp","Port":8285}`,
	"wireguard": `{"Type":"wireguard","Port":51820,"Mode":"auto"}`,
	"host-gw":   `{"Type":"host-gw"}`,
	"vxlan":     `{"Type":"vxlan"}`,
}

// BackendNames lists Backends in a stable order.
func BackendNames() []string {
	names := make([]string, 0, len(Backends))
	for n := range Backends {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Missing says what this machine lacks for a conformance run, or "".
func Missing() string {
	if why := kubecluster.Missing(); why != "" {
		return why
	}
	return kubecluster.MissingE2E()
}

// Options shape a run's cluster.
type Options struct {
	Backend string // a key of Backends
	Root    string // the tulle repository
	Dir     string // the cluster's files and logs
	Workers int    // kubelet nodes beside the control plane's (default 2)
	Logf    func(format string, args ...any)
}

// Cluster is a conformance-ready cluster with tulle on every node.
type Cluster struct {
	*kubecluster.Cluster
	Backend string
	logf    func(format string, args ...any)
}

// Start builds the cluster — control plane node + workers, the e2e
// images on every node — installs tulle with the backend and CoreDNS, and
// waits until both are Ready. On error nothing is left.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	be, ok := Backends[o.Backend]
	if !ok {
		return nil, fmt.Errorf("backend %q: want one of %s", o.Backend, strings.Join(BackendNames(), ", "))
	}
	if o.Workers == 0 {
		o.Workers = 2
	}
	netConf, err := netConfWith(filepath.Join(o.Root, "deploy", "net-conf.json"), be)
	if err != nil {
		return nil, err
	}
	c, err := kubecluster.Start(ctx, kubecluster.Options{
		Nodes: o.Workers, Dir: o.Dir, Root: o.Root, Prefix: "tullecf", Logf: o.Logf,
		ControlPlaneNode: true, E2E: true,
	})
	if err != nil {
		return nil, err
	}
	cc := &Cluster{Cluster: c, Backend: o.Backend, logf: o.Logf}
	if err := cc.install(ctx, netConf); err != nil {
		c.Close()
		return nil, err
	}
	return cc, nil
}

func (c *Cluster) install(ctx context.Context, netConf string) error {
	start := time.Now()
	if err := c.InstallTulle(ctx, kubecluster.Overlay{Tag: kubecluster.RandomTag("cf"), NetConf: netConf}); err != nil {
		return err
	}
	if err := c.WaitTulle(ctx, 3*time.Minute); err != nil {
		return err
	}
	if err := c.DeployDNS(ctx); err != nil {
		return fmt.Errorf("cluster DNS: %w", err)
	}
	if c.logf != nil {
		c.logf("tulle (%s) and CoreDNS ready on %d nodes in %s", c.Backend, len(c.Nodes), time.Since(start).Round(time.Second))
	}
	return nil
}

// netConfWith is the net-conf.json at path with its Backend replaced.
func netConfWith(path, backend string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var nc map[string]json.RawMessage
	if err := json.Unmarshal(b, &nc); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	nc["Backend"] = json.RawMessage(backend)
	out, err := json.MarshalIndent(nc, "", "  ")
	return string(out) + "\n", err
}

// Result is one suite's run.
type Result struct {
	Suite, Backend string
	Specs          []Spec
	Duration       time.Duration
	// Setup is the failure of a suite-level node (the framework's
	// BeforeSuite, say), or "": such a failure fails every spec.
	Setup string
}

// Spec is one upstream test's outcome.
type Spec struct {
	Name     string // the spec's full text
	State    string // passed, failed, or skipped (it ran and called Skip)
	Duration time.Duration
	Failure  string // what the test said, for a failure or a skip
}

// Counts returns how many specs passed, failed and skipped.
func (r *Result) Counts() (passed, failed, skipped int) {
	for _, s := range r.Specs {
		switch s.State {
		case "passed":
			passed++
		case "skipped":
			skipped++
		default:
			failed++
		}
	}
	if r.Setup != "" && failed == 0 {
		failed = 1
	}
	return
}

// Summary is the suite's one line: "NAME (BACKEND): N passed, N failed,
// N skipped".
func (r *Result) Summary() string {
	p, f, s := r.Counts()
	return fmt.Sprintf("%s (%s): %d passed, %d failed, %d skipped", r.Suite, r.Backend, p, f, s)
}

// Run runs suite against the cluster with procs ginkgo processes, the
// e2e output and JUnit report in out (made if missing), then the tulle
// pods' logs beside them.
func (c *Cluster) Run(ctx context.Context, s Suite, out string, procs int, timeout time.Duration) (*Result, error) {
	// Absolute: ginkgo runs a precompiled suite in the binary's own
	// directory, where a relative --report-dir would put the JUnit.
	out, err := filepath.Abs(out)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(out, "e2e.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	e2e := kubecluster.E2EDir()
	args := []string{"run", "--procs", strconv.Itoa(procs), "--no-color", "--timeout", timeout.String(),
		"--focus", s.Focus}
	if s.Skip != "" {
		args = append(args, "--skip", s.Skip)
	}
	args = append(args, filepath.Join(e2e, "e2e.test"), "--",
		"--kubeconfig", c.Kubeconfig, "--provider", "skeleton", "--report-dir", out,
		// kubectl for the tests that exec it: the cluster's own version.
		"--kubectl-path", kubetest.Bin("kubectl"),
		"--non-blocking-taints", "node-role.kubernetes.io/control-plane",
		"--dump-logs-on-failure=false", "--disable-log-dump")
	cmd := exec.CommandContext(ctx, filepath.Join(e2e, "ginkgo"), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	fmt.Fprintf(logf, "# %s\n", strings.Join(cmd.Args, " "))
	start := time.Now()
	runErr := cmd.Run()
	res, err := ReadJUnit(filepath.Join(out, "junit_01.xml"))
	if err != nil {
		return nil, fmt.Errorf("%s: %w (ginkgo: %v; see %s)", s.Name, err, runErr, logf.Name())
	}
	res.Suite, res.Backend, res.Duration = s.Name, c.Backend, time.Since(start)
	c.saveTulleLogs(ctx, out)
	return res, nil
}

// saveTulleLogs writes each node's tulle pod log (tulle-<node>.log) and
// tulled's status (status-<node>.json: per peer the backend and why)
// into dir.
func (c *Cluster) saveTulleLogs(ctx context.Context, dir string) {
	pods, err := c.Client.CoreV1().Pods(kubecluster.TulleNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=tulle"})
	if err != nil {
		os.WriteFile(filepath.Join(dir, "tulle-logs.err"), []byte(err.Error()), 0o644)
		return
	}
	for _, p := range pods.Items {
		out, err := c.Kubectl(ctx, "-n", kubecluster.TulleNamespace, "logs", p.Name, "-c", "tulled")
		if err != nil {
			out = err.Error()
		}
		os.WriteFile(filepath.Join(dir, "tulle-"+p.Spec.NodeName+".log"), []byte(out), 0o644)
	}
	for _, n := range c.Nodes {
		st, err := n.TulleStatus(ctx)
		var b []byte
		if err == nil {
			b, err = json.MarshalIndent(st, "", "  ")
		}
		if err != nil {
			b = []byte(err.Error())
		}
		os.WriteFile(filepath.Join(dir, "status-"+n.Name+".json"), b, 0o644)
	}
}

// junit is the part of ginkgo's JUnit report read here.
type junit struct {
	Suites []struct {
		Cases []struct {
			Name    string  `xml:"name,attr"`
			Status  string  `xml:"status,attr"`
			Time    float64 `xml:"time,attr"`
			Skipped *struct {
				Message string `xml:"message,attr"`
			} `xml:"skipped"`
			Failure *struct {
				Message string `xml:"message,attr"`
				Text    string `xml:",chardata"`
			} `xml:"failure"`
			Error *struct {
				Message string `xml:"message,attr"`
				Text    string `xml:",chardata"`
			} `xml:"error"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// ReadJUnit reads the framework's JUnit report: every spec that ran
// ("[It] …" cases; those the focus left out are reported as skipped with
// the bare message "skipped" and are not counted), and any failed
// suite-level node.
func ReadJUnit(path string) (*Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readJUnit(f)
}

func readJUnit(r io.Reader) (*Result, error) {
	var j junit
	if err := xml.NewDecoder(r).Decode(&j); err != nil {
		return nil, fmt.Errorf("junit report: %w", err)
	}
	res := &Result{}
	for _, s := range j.Suites {
		for _, tc := range s.Cases {
			text := ""
			switch {
			case tc.Failure != nil:
				text = strings.TrimSpace(tc.Failure.Message + "\n" + tc.Failure.Text)
			case tc.Error != nil:
				text = strings.TrimSpace(tc.Error.Message + "\n" + tc.Error.Text)
			}
			name, isSpec := strings.CutPrefix(tc.Name, "[It] ")
			if !isSpec {
				if tc.Status != "passed" && tc.Status != "skipped" && res.Setup == "" {
					res.Setup = tc.Name + ": " + text
				}
				continue
			}
			state := tc.Status
			switch state {
			case "passed":
			case "skipped":
				if tc.Skipped == nil || tc.Skipped.Message == "skipped" || tc.Skipped.Message == "" {
					continue // not selected
				}
				text = tc.Skipped.Message
			case "pending":
				continue
			default:
				state = "failed"
			}
			res.Specs = append(res.Specs, Spec{Name: name, State: state, Duration: time.Duration(tc.Time * float64(time.Second)), Failure: text})
		}
	}
	slices.SortFunc(res.Specs, func(a, b Spec) int { return strings.Compare(a.Name, b.Name) })
	if len(res.Specs) == 0 && res.Setup == "" {
		return res, errors.New("junit report lists no spec that ran")
	}
	return res, nil
}
