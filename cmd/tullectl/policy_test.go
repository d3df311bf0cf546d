package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/internal/api"
)

func TestPrintPolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    api.PolicyStatus
		want []string
	}{
		{"off", api.PolicyStatus{}, []string{"not enforced"}},
		{"pods", api.PolicyStatus{Enabled: true, Synced: true, Problems: []api.PolicyProblem{{Policy: "x/p", Message: "bad"}}, Pods: []api.PodPolicy{
			{Pod: "x/open", IPs: []netip.Addr{netip.MustParseAddr("100.64.1.2")}},
			{Pod: "x/db", IPs: []netip.Addr{netip.MustParseAddr("100.64.1.3")}, IngressIsolated: true, EgressIsolated: true, Policies: []string{"x/p"},
				Ingress: []api.PolicyRule{{Policy: "x/p", Peers: []string{"100.64.2.0/24"}, Ports: []string{"tcp/5432"}}}},
		}}, []string{
			"problem  x/p: bad",
			"x/open  100.64.1.2  open",
			"x/db    100.64.1.3  isolated, 1 rules  isolated, 0 rules  x/p",
			"ingress allow from 100.64.2.0/24 on tcp/5432 (x/p)",
			"egress: nothing allowed",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := printPolicy(&b, &tc.s); err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, b.String())
				}
			}
		})
	}
}
