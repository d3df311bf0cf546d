// Command conformance is `make conformance`: it starts a real cluster on
// this machine (the control plane a tulle node, two workers, cluster DNS),
// installs tulle for one backend, runs the Kubernetes project's own
// networking suites against it (internal/tstest/conformance) and removes
// everything after. Each suite's JUnit report, ginkgo output and the
// tulle pods' logs go to OUT/<backend>/<suite>/; one line per suite says
// what passed. It exits 1 when a suite named by --require failed, 2 on
// bad flags or a machine that lacks what a run needs. With --report it
// runs nothing and prints the results found under OUT as the table
// docs/conformance.md keeps.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/conformance"
)

func main() {
	backend := flag.String("backend", "udp", "tulle's backend: "+strings.Join(conformance.BackendNames(), ", "))
	suites := flag.String("suites", "conformance,netpol", "suites to run, in order: conformance ([sig-network] [Conformance]), netpol ([sig-network] Netpol)")
	require := flag.String("require", "conformance,netpol", "suites whose failures fail the run (the others are reported)")
	out := flag.String("out", "conformance-out", "where each suite's JUnit report and logs go (OUT/<backend>/<suite>/)")
	procs := flag.Int("procs", 4, "ginkgo processes")
	timeout := flag.Duration("timeout", 2*time.Hour, "longest a suite may run (the Netpol suite takes about 40 minutes on 2 vCPUs)")
	root := flag.String("root", ".", "the tulle repository")
	report := flag.Bool("report", false, "run nothing: print, as a Markdown table, every spec's result per backend from the JUnit reports under --out")
	flag.Parse()
	if *report {
		if err := printReport(os.Stdout, *out); err != nil {
			fmt.Fprintln(os.Stderr, "conformance:", err)
			os.Exit(1)
		}
		return
	}

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

// printReport writes, per suite found under out, a Markdown table: one row
// per spec, one column per backend that ran it.
func printReport(w io.Writer, out string) error {
	results := map[string]map[string]*conformance.Result{} // suite → backend → result
	paths, _ := filepath.Glob(filepath.Join(out, "*", "*", "junit_01.xml"))
	if len(paths) == 0 {
		return fmt.Errorf("no JUnit report under %s/<backend>/<suite>/", out)
	}
	for _, p := range paths {
		res, err := conformance.ReadJUnit(p)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		suite, backend := filepath.Base(filepath.Dir(p)), filepath.Base(filepath.Dir(filepath.Dir(p)))
		if results[suite] == nil {
			results[suite] = map[string]*conformance.Result{}
		}
		res.Suite, res.Backend = suite, backend
		results[suite][backend] = res
	}
	for _, s := range conformance.Suites {
		byBackend := results[s.Name]
		if byBackend == nil {
			continue
		}
		backends := slices.Sorted(maps.Keys(byBackend))
		states := map[string]map[string]string{} // spec → backend → state
		for b, res := range byBackend {
			for _, sp := range res.Specs {
				if states[sp.Name] == nil {
					states[sp.Name] = map[string]string{}
				}
				states[sp.Name][b] = sp.State
			}
		}
		fmt.Fprintf(w, "### %s\n\n| spec |", s.Name)
		for _, b := range backends {
			fmt.Fprintf(w, " %s |", b)
		}
		fmt.Fprint(w, "\n|---|")
		for range backends {
			fmt.Fprint(w, "---|")
		}
		fmt.Fprint(w, "\n")
		for _, name := range slices.Sorted(maps.Keys(states)) {
			fmt.Fprintf(w, "| %s |", strings.ReplaceAll(name, "|", "\\|"))
			for _, b := range backends {
				st := states[name][b]
				if st == "" {
					st = "not run"
				}
				fmt.Fprintf(w, " %s |", st)
			}
			fmt.Fprint(w, "\n")
		}
		fmt.Fprint(w, "| **total** |")
		for _, b := range backends {
			p, f, sk := byBackend[b].Counts()
			fmt.Fprintf(w, " %d passed, %d failed, %d skipped |", p, f, sk)
		}
		fmt.Fprint(w, "\n\n")
	}
	return nil
}
