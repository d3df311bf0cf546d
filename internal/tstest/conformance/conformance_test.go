package conformance

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
)

// TestSigNetworkConformance runs the upstream `[sig-network]
// [Conformance]` specs against a real cluster with tulle on the udp
// backend (the control plane a tulle node): each spec is a subtest here,
// so a failure names the upstream test and says what it saw. This is what
// CI runs, with part of the Netpol suite on the same cluster (NetpolCI);
// `make conformance` runs either for any backend, and the whole Netpol
// suite.
func TestSigNetworkConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("a whole cluster and the upstream suite: not in -short")
	}
	testenv.Require(t, Missing())
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	root, _ := filepath.Abs("../../..")
	start := time.Now()
	c, err := Start(ctx, Options{Backend: "udp", Root: root, Dir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	t.Logf("cluster with tulle ready in %s", time.Since(start).Round(time.Second))
	out := t.TempDir()
	s, _ := SuiteByName("conformance")
	res, err := c.Run(ctx, s.ForMachine(), out, 4, 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(res.Summary(), "in", res.Duration.Round(time.Second))
	if res.Setup != "" {
		t.Errorf("suite setup failed: %s", res.Setup)
	}
	specSubtests(t, res)
	if p, _, _ := res.Counts(); p < 45 {
		b, _ := os.ReadFile(filepath.Join(out, "e2e.log"))
		t.Errorf("%d specs passed, want all 45 of [sig-network] [Conformance] (v1.34); e2e output:\n%s", p, tail(string(b), 200))
	}

	// NetworkPolicy on the same cluster: part of the Netpol suite (the
	// whole runs through make conformance).
	t.Run("Netpol", func(t *testing.T) {
		out := t.TempDir()
		res, err := c.Run(ctx, NetpolCI.ForMachine(), out, 4, 25*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		t.Log(res.Summary(), "in", res.Duration.Round(time.Second))
		if res.Setup != "" {
			t.Errorf("suite setup failed: %s", res.Setup)
		}
		specSubtests(t, res)
		if p, _, _ := res.Counts(); p < 11 {
			b, _ := os.ReadFile(filepath.Join(out, "e2e.log"))
			t.Errorf("%d specs passed, want the 11 NetpolCI names; e2e output:\n%s", p, tail(string(b), 200))
		}
	})
}

// specSubtests makes each spec of res a subtest that fails unless it
// passed.
func specSubtests(t *testing.T, res *Result) {
	for _, sp := range res.Specs {
		t.Run(sp.Name, func(t *testing.T) {
			switch sp.State {
			case "passed":
			case "skipped":
				// An upstream spec that skips itself on this cluster is a
				// harness gap to close, not a pass.
				t.Errorf("skipped itself: %s", sp.Failure)
			default:
				t.Errorf("failed after %s:\n%s", sp.Duration.Round(time.Millisecond), sp.Failure)
			}
		})
	}
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// TestReadJUnit: specs that ran are read with their state and failure
// text; those the focus left out are not counted; a failed suite node is
// reported as the setup failure.
func TestReadJUnit(t *testing.T) {
	const report = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="5" disabled="0" errors="0" failures="1" time="12.5">
  <testsuite name="Kubernetes e2e suite" package="/e2e" tests="6" skipped="2" failures="1" errors="0" time="12.5">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1.0"></testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]" classname="Kubernetes e2e suite" status="passed" time="7.25"></testcase>
    <testcase name="[It] [sig-network] Netpol should deny ingress [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="failed" time="3.0">
      <failure message="" type="failed">[FAILED] expected blocked pod connection was instead ALLOWED</failure>
    </testcase>
    <testcase name="[It] [sig-network] Netpol should work with SCTP [Feature:SCTPConnectivity]" classname="Kubernetes e2e suite" status="skipped" time="0.1">
      <skipped message="skipped - the cluster lacks SCTP"></skipped>
    </testcase>
    <testcase name="[It] [sig-storage] CSI mock volume works" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-network] DNS should time out [Conformance]" classname="Kubernetes e2e suite" status="timedout" time="60">
      <failure message="" type="timedout">timed out</failure>
    </testcase>
  </testsuite>
</testsuites>`
	res, err := readJUnit(strings.NewReader(report))
	if err != nil {
		t.Fatal(err)
	}
	p, f, s := res.Counts()
	if p != 1 || f != 2 || s != 1 {
		t.Errorf("counts %d passed, %d failed, %d skipped; want 1, 2, 1 (specs %+v)", p, f, s, res.Specs)
	}
	if res.Setup != "" {
		t.Errorf("setup failure %q from a passed BeforeSuite", res.Setup)
	}
	for _, sp := range res.Specs {
		if strings.HasPrefix(sp.Name, "[It]") {
			t.Errorf("spec name keeps the leaf type: %q", sp.Name)
		}
		if strings.Contains(sp.Name, "Netpol should deny") && !strings.Contains(sp.Failure, "instead ALLOWED") {
			t.Errorf("failure text %q", sp.Failure)
		}
		if strings.Contains(sp.Name, "Services should serve") && sp.Duration != 7250*time.Millisecond {
			t.Errorf("duration %s, want 7.25s", sp.Duration)
		}
	}

	broken := strings.Replace(report, `name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1.0"></testcase>`,
		`name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="failed" time="1.0"><failure message="" type="failed">no nodes ready</failure></testcase>`, 1)
	res, err = readJUnit(strings.NewReader(broken))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Setup, "no nodes ready") {
		t.Errorf("setup failure %q, want the BeforeSuite's", res.Setup)
	}

	if _, err := readJUnit(strings.NewReader(`<testsuites><testsuite><testcase name="[It] x" status="skipped"><skipped message="skipped"/></testcase></testsuite></testsuites>`)); err == nil {
		t.Error("a report where nothing ran read without error")
	}
	if _, err := readJUnit(strings.NewReader(`<testsuites><testsuite>`)); err == nil {
		t.Error("a truncated report read without error")
	}
}

// TestNetConfWith: the shipped net-conf with only its Backend replaced.
func TestNetConfWith(t *testing.T) {
	root, _ := filepath.Abs("../../..")
	for _, name := range BackendNames() {
		got, err := netConfWith(filepath.Join(root, "deploy", "net-conf.json"), Backends[name])
		if err != nil {
			t.Fatal(err)
		}
		var nc struct {
			Network string
			Backend struct{ Type string }
		}
		if err := json.Unmarshal([]byte(got), &nc); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, got)
		}
		if nc.Backend.Type != name || nc.Network != "100.96.0.0/12" {
			t.Errorf("%s: net-conf %s", name, got)
		}
	}
	if _, err := netConfWith(filepath.Join(t.TempDir(), "missing.json"), Backends["udp"]); err == nil {
		t.Error("a missing net-conf gave no error")
	}
}

// TestSuiteByName: the names make conformance takes.
func TestSuiteByName(t *testing.T) {
	for name, want := range map[string]string{"conformance": "sig-network-conformance", "sig-network-conformance": "sig-network-conformance", "netpol": "netpol"} {
		if s, ok := SuiteByName(name); !ok || s.Name != want {
			t.Errorf("SuiteByName(%q) = %q, %v; want %q", name, s.Name, ok, want)
		}
	}
	if _, ok := SuiteByName("network"); ok {
		t.Error(`SuiteByName("network") found a suite`)
	}
}
