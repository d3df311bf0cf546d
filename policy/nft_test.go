package policy

import (
	"context"
	"slices"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// TestRealNFT applies what Compile renders to the kernel's nftables (in a
// namespace of its own), step by step and rebuilt, and reads the drop
// counters back: the syntax the fake takes on trust, the kernel judges.
func TestRealNFT(t *testing.T) {
	testenv.Require(t, topo.Require())
	testenv.RequireTools(t, "nft")
	tp, err := topo.New(topo.Options{Nodes: 1, Prefix: "tlpol"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	n := tp.Nodes[0]
	end := int32(5010)
	pols := []*networkingv1.NetworkPolicy{
		pol("x", "p1", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{PodSelector: sel(map[string]string{"app": "b"})}, {IPBlock: &networkingv1.IPBlock{CIDR: "100.64.0.0/10", Except: []string{"100.64.2.0/24"}}}},
			Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromString("http"), &tcp), {Protocol: &udp, Port: &intstr.IntOrString{IntVal: 5000}, EndPort: &end}},
		}}}),
		pol("x", "p2", nil, networkingv1.NetworkPolicySpec{PolicyTypes: egress, Egress: []networkingv1.NetworkPolicyEgressRule{{
			To:    []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel(map[string]string{"ns": "y"})}, {IPBlock: &networkingv1.IPBlock{CIDR: "fd00::/8"}}},
			Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromString("http"), &tcp), port(intstr.FromInt32(53), &udp)},
		}}}),
	}
	steps := [][]*networkingv1.NetworkPolicy{nil, pols[:1], pols, pols[1:], nil}
	err = n.Do(func() error {
		ctx := context.Background()
		nft, err := knftables.New(knftables.InetFamily, TableName)
		if err != nil {
			return err
		}
		tbl := NewTable(nft)
		for i, s := range steps {
			rs, _ := Compile(state(s...))
			if err := tbl.Apply(ctx, rs); err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
			if err := tbl.Check(ctx); err != nil {
				t.Fatalf("step %d check: %v", i, err)
			}
			if err := NewTable(nft).Apply(ctx, rs); err != nil {
				t.Fatalf("step %d rebuild: %v", i, err)
			}
		}
		// A restart that finds a pod gone: the rebuilt table holds
		// nothing of it (no stale element, no stale chain).
		st := state(pols...)
		delete(st.Local, podA.IPs[0])
		delete(st.Local, podA.IPs[1])
		rs, _ := Compile(st)
		if err := NewTable(nft).Apply(ctx, rs); err != nil {
			t.Fatalf("rebuild without a: %v", err)
		}
		els, err := nft.ListElements(ctx, "set", "local-v4")
		if err != nil {
			t.Fatal(err)
		}
		if len(els) != 1 || els[0].Key[0] != "100.64.1.3" {
			t.Errorf("local-v4 after rebuilding without a: %v", els)
		}
		if chains, _ := nft.List(ctx, "chains"); slices.Contains(chains, podChain(podA, dirIn)) {
			t.Errorf("a's chain outlived the rebuild: %v", chains)
		}
		d, err := tbl.Dropped(ctx)
		if err != nil {
			t.Fatalf("dropped: %v", err)
		}
		if _, ok := d.ByReason["unattached"]; !ok {
			t.Errorf("drops by reason: %v", d.ByReason)
		}
		if _, ok := d.ByPolicy["x/p2 egress"]; !ok {
			t.Errorf("drops by policy: %v, want x/p2 egress (b is local and isolated by it)", d.ByPolicy)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	out, err := n.Run("nft", "list", "table", "inet", TableName)
	if err != nil || !strings.Contains(out, "hook forward") {
		t.Fatalf("table: %v\n%s", err, out)
	}
	// tulled cleanup: the table goes; a second cleanup finds nothing to do.
	for i := range 2 {
		if err := n.Do(func() error { return Cleanup(context.Background()) }); err != nil {
			t.Fatalf("cleanup %d: %v", i+1, err)
		}
	}
	if out, err := n.Run("nft", "list", "tables"); err != nil || strings.Contains(out, TableName) {
		t.Errorf("after cleanup: %v\n%s", err, out)
	}
}
