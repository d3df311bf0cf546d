package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/tulle-net/tulle/internal/api"
)

// policyCmd shows the NetworkPolicy state of a node's pods: which
// policies select each, and what it may send and receive.
func policyCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("policy", flag.ContinueOnError)
	runDir := fs.String("run-dir", "/run/tulle", "tulled's run directory")
	output := fs.String("o", "text", "text, or json (for scripts)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: tullectl policy [--run-dir DIR] [-o text|json] [NAMESPACE/POD]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *output != "text" && *output != "json" {
		return fmt.Errorf("policy: -o %q, want text or json", *output)
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("policy: one pod at most (NAMESPACE/POD), got %q", fs.Args())
	}
	s, err := api.GetPolicy(ctx, filepath.Join(*runDir, api.SocketName))
	if err != nil {
		return err
	}
	if want := fs.Arg(0); want != "" {
		var pods []api.PodPolicy
		for _, p := range s.Pods {
			if p.Pod == want {
				pods = append(pods, p)
			}
		}
		if pods == nil {
			return fmt.Errorf("policy: no pod %s on this node", want)
		}
		s.Pods = pods
	}
	if *output == "json" {
		e := json.NewEncoder(os.Stdout)
		e.SetIndent("", "  ")
		return e.Encode(s)
	}
	return printPolicy(os.Stdout, s)
}

// printPolicy writes, per local pod, its isolation and allow lists.
func printPolicy(out io.Writer, s *api.PolicyStatus) error {
	if !s.Enabled {
		_, err := fmt.Fprintln(out, "NetworkPolicy is not enforced on this node (tulled --network-policy=false, or not --lease-store kube)")
		return err
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	state := "applied " + s.Applied.Format("15:04:05")
	if !s.Synced {
		state = "not yet applied"
	}
	if s.Error != "" {
		state += "; last change failed: " + s.Error
	}
	fmt.Fprintf(w, "rules\t%s\n", state)
	for _, p := range s.Problems {
		fmt.Fprintf(w, "problem\t%s: %s\n", p.Policy, p.Message)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "POD\tADDRESSES\tINGRESS\tEGRESS\tPOLICIES")
	for _, p := range s.Pods {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", p.Pod, join(p.IPs), isolation(p.IngressIsolated, p.Ingress), isolation(p.EgressIsolated, p.Egress), strings.Join(p.Policies, ","))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	for _, p := range s.Pods {
		if !p.IngressIsolated && !p.EgressIsolated {
			continue
		}
		fmt.Fprintf(out, "\n%s\n", p.Pod)
		for _, d := range []struct {
			name     string
			isolated bool
			rules    []api.PolicyRule
			peer     string
		}{{"ingress", p.IngressIsolated, p.Ingress, "from"}, {"egress", p.EgressIsolated, p.Egress, "to"}} {
			if !d.isolated {
				continue
			}
			if len(d.rules) == 0 {
				fmt.Fprintf(out, "  %s: nothing allowed\n", d.name)
			}
			for _, r := range d.rules {
				ports := "every port"
				if len(r.Ports) > 0 {
					ports = strings.Join(r.Ports, " ")
				}
				peers := strings.Join(r.Peers, " ")
				if peers == "" {
					peers = "nobody"
				}
				fmt.Fprintf(out, "  %s allow %s %s on %s (%s)\n", d.name, d.peer, peers, ports, r.Policy)
			}
		}
	}
	return nil
}

func isolation(isolated bool, rules []api.PolicyRule) string {
	if !isolated {
		return "open"
	}
	return fmt.Sprintf("isolated, %d rules", len(rules))
}

func join[T fmt.Stringer](xs []T) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = x.String()
	}
	return strings.Join(s, ",")
}
