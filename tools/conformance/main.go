// Command conformance is `make conformance`: it starts a real cluster on
// this machine (the control plane a tulle node, two workers, cluster DNS),
// installs tulle for one backend, runs the Kubernetes project's own
// networking suites against it (internal/conformance) and removes
// everything after. Each suite's JUnit report, ginkgo output and the
// tulle pods' logs go to OUT/<backend>/<suite>/; one line per suite says
// what passed. It exits 1 when a suite named by --require failed, 2 on
// bad flags or a machine that lacks what a run needs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/internal/conformance"
)

func main() {
	backend := flag.String("backend", "udp", "tulle's backend: "+strings.Join(conformance.BackendNames(), ", "))
	suites := flag.String("suites", "conformance,netpol", "suites to run, in order: conformance ([sig-network] [Conformance]), netpol ([sig-network] Netpol)")
	require := flag.String("require", "conformance", "suites whose failures fail the run (the others are reported)")
	out := flag.String("out", "conformance-out", "where each suite's JUnit report and logs go (OUT/<backend>/<suite>/)")
	procs := flag.Int("procs", 4, "ginkgo processes")
	timeout := flag.Duration("timeout", time.Hour, "longest a suite may run")
	root := flag.String("root", ".", "the tulle repository")
	flag.Parse()

	bad := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "conformance: "+format+"\n", args...)
		os.Exit(2)
	}
	if _, ok := conformance.Backends[*backend]; !ok {
		bad("--backend %q: want one of %s", *backend, strings.Join(conformance.BackendNames(), ", "))
	}
	var run []conformance.Suite
	for _, n := range strings.Split(*suites, ",") {
		s, ok := conformance.SuiteByName(strings.TrimSpace(n))
		if !ok {
			bad("--suites: unknown suite %q (conformance, netpol)", n)
		}
		run = append(run, s.ForMachine())
	}
	required := map[string]bool{}
	for _, n := range strings.Split(*require, ",") {
		if n = strings.TrimSpace(n); n == "" {
			continue
		}
		s, ok := conformance.SuiteByName(n)
		if !ok {
			bad("--require: unknown suite %q", n)
		}
		required[s.Name] = true
	}
	if *procs < 1 {
		bad("--procs %d: want at least 1", *procs)
	}
	if why := conformance.Missing(); why != "" {
		bad("this machine lacks %s", why)
	}
	absRoot, err := filepath.Abs(*root)
	if err != nil {
		bad("--root: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(runAll(ctx, absRoot, *backend, *out, run, required, *procs, *timeout))
}

func runAll(ctx context.Context, root, backend, out string, suites []conformance.Suite, required map[string]bool, procs int, timeout time.Duration) int {
	logf := func(format string, args ...any) {
		fmt.Printf("%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
	dir, err := os.MkdirTemp("", "tulle-conformance-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	start := time.Now()
	c, err := conformance.Start(ctx, conformance.Options{Backend: backend, Root: root, Dir: dir, Logf: logf})
	if err != nil {
		fmt.Fprintln(os.Stderr, "conformance: cluster:", err)
		return 1
	}
	defer func() {
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "conformance: removing the cluster:", err)
		}
	}()
	logf("cluster with tulle (%s) ready in %s", backend, time.Since(start).Round(time.Second))
	var lines []string
	code := 0
	for _, s := range suites {
		logf("running %s: --focus %q%s", s.Name, s.Focus, skipNote(s))
		sdir := filepath.Join(out, backend, s.Name)
		res, err := c.Run(ctx, s, sdir, procs, timeout)
		if err != nil {
			fmt.Fprintln(os.Stderr, "conformance:", err)
			lines = append(lines, fmt.Sprintf("%s (%s): did not complete: %v", s.Name, backend, err))
			if required[s.Name] {
				code = 1
			}
			continue
		}
		_, failed, _ := res.Counts()
		for _, sp := range res.Specs {
			if sp.State != "passed" {
				logf("  %s: %s", strings.ToUpper(sp.State), sp.Name)
			}
		}
		if res.Setup != "" {
			logf("  suite setup failed: %s", firstLine(res.Setup))
		}
		logf("%s in %s; JUnit and logs in %s", res.Summary(), res.Duration.Round(time.Second), sdir)
		lines = append(lines, res.Summary())
		if failed > 0 && required[s.Name] {
			code = 1
		}
	}
	for _, l := range lines {
		fmt.Println(l)
	}
	return code
}

func skipNote(s conformance.Suite) string {
	if s.Skip == "" {
		return ""
	}
	return fmt.Sprintf(", --skip %q: %s", s.Skip, s.Why)
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
