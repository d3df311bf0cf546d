// Command testsum reads `go test -json` on stdin and prints what a person
// wants from a test run: each package's result line, the output of every
// test that failed, and one closing line counting passes, failures and
// skips, with the skipped tests named (a skip is never silent). It exits
// 1 when anything failed, or when the input ends without a result for a
// package (a build failure or a crash).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
)

type event struct {
	Action     string
	Package    string
	ImportPath string // build-output and build-fail events
	Test       string
	Output     string
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	output := map[string][]string{} // package/test → its output lines
	var passed, failed int
	var skipped, failures []string
	started, finished := map[string]bool{}, map[string]bool{}
	for in.Scan() {
		line := in.Bytes()
		var e event
		if json.Unmarshal(line, &e) != nil || e.Action == "" {
			fmt.Println(string(line)) // not test2json: a build error, say
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "build-output":
			fmt.Print(e.Output)
			continue
		case "build-fail":
			failures = append(failures, e.ImportPath+" (build failed)")
			continue
		case "start":
			started[e.Package] = true
		case "output":
			if e.Test == "" {
				// Package-level lines: ok/FAIL/"no test files", build output.
				if o := strings.TrimRight(e.Output, "\n"); o != "" && !strings.HasPrefix(o, "=== ") && o != "PASS" && o != "FAIL" {
					fmt.Println(o)
				}
				continue
			}
			output[key] = append(output[key], e.Output)
		case "pass", "fail", "skip":
			if e.Test == "" {
				finished[e.Package] = true
				if e.Action == "fail" && !slices.ContainsFunc(failures, func(f string) bool { return strings.HasPrefix(f, e.Package+" ") }) {
					failures = append(failures, e.Package+" (package)")
				}
				continue
			}
			switch e.Action {
			case "pass":
				passed++
			case "fail":
				failed++
				failures = append(failures, key)
				fmt.Print(strings.Join(output[key], ""))
			case "skip":
				skipped = append(skipped, key)
				for _, o := range output[key] {
					if strings.Contains(o, "_test.go:") || strings.Contains(o, "SKIP") {
						fmt.Printf("skipped %s: %s", key, strings.TrimSpace(o)+"\n")
						break
					}
				}
			}
			delete(output, key)
		}
	}
	for p := range started {
		if !finished[p] {
			failures = append(failures, p+" (no result: build failure or crash)")
		}
	}
	if len(skipped) > 0 {
		fmt.Printf("skipped: %s\n", strings.Join(skipped, ", "))
	}
	if len(failures) > 0 {
		slices.Sort(failures)
		fmt.Printf("failed: %s\n", strings.Join(failures, ", "))
	}
	// A package that failed to build or crashed counts as a failure too.
	fmt.Printf("tests: %d passed, %d failed, %d skipped\n", passed, max(failed, len(failures)), len(skipped))
	if len(failures) > 0 {
		os.Exit(1)
	}
}
