package policy

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/knftables"
)

// A small cluster: this node holds 100.64.1.0/24 (and fd00:64:1::/64);
// pods x/a and x/b are local, y/c is remote.
var (
	podA = &Pod{Namespace: "x", Name: "a", Node: "n1", Labels: map[string]string{"app": "a"}, IPs: addrs("100.64.1.2", "fd00:64:1::2"),
		Ports: []NamedPort{{"http", corev1.ProtocolTCP, 8080}}}
	podB = &Pod{Namespace: "x", Name: "b", Node: "n1", Labels: map[string]string{"app": "b"}, IPs: addrs("100.64.1.3"),
		Ports: []NamedPort{{"http", corev1.ProtocolTCP, 9090}}}
	podC = &Pod{Namespace: "y", Name: "c", Node: "n2", Labels: map[string]string{"app": "c"}, IPs: addrs("100.64.2.2", "fd00:64:2::2"),
		Ports: []NamedPort{{"http", corev1.ProtocolTCP, 7070}}}
	hostPod = &Pod{Namespace: "y", Name: "h", Node: "n2", Labels: map[string]string{"app": "c"}, IPs: addrs("198.18.0.2"), HostNetwork: true}
)

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}

func state(pols ...*networkingv1.NetworkPolicy) *State {
	st := &State{
		Pods:       []*Pod{podA, podB, podC, hostPod},
		Namespaces: map[string]map[string]string{"x": {"ns": "x"}, "y": {"ns": "y"}},
		Policies:   pols,
		Local:      map[netip.Addr]*Pod{},
		Subnets:    []netip.Prefix{netip.MustParsePrefix("100.64.1.0/24"), netip.MustParsePrefix("fd00:64:1::/64")},
	}
	for _, p := range []*Pod{podA, podB} {
		for _, a := range p.IPs {
			st.Local[a] = p
		}
	}
	return st
}

func pol(ns, name string, sel map[string]string, spec networkingv1.NetworkPolicySpec) *networkingv1.NetworkPolicy {
	spec.PodSelector = metav1.LabelSelector{MatchLabels: sel}
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec}
}

var (
	tcp, udp = corev1.ProtocolTCP, corev1.ProtocolUDP
	ingress  = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	egress   = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
)

func port(p intstr.IntOrString, proto *corev1.Protocol) networkingv1.NetworkPolicyPort {
	return networkingv1.NetworkPolicyPort{Port: &p, Protocol: proto}
}

func sel(l map[string]string) *metav1.LabelSelector { return &metav1.LabelSelector{MatchLabels: l} }

// elems returns a set's keys, sorted.
func elems(rs *Ruleset, name string) []string {
	s := rs.Sets[name]
	if s == nil {
		return nil
	}
	var out []string
	for k := range s.Elems {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func TestCompile(t *testing.T) {
	pk := func(p *networkingv1.NetworkPolicy) string { return "pol-" + id(policyKey(p)) }
	denyAll := pol("x", "deny", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{PolicyTypes: ingress})
	fromC := pol("x", "from-c", nil, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel(map[string]string{"ns": "y"}), PodSelector: sel(map[string]string{"app": "c"})}},
	}}})
	named := pol("x", "named", nil, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromString("http"), &tcp)},
	}}})
	nothing := pol("x", "nothing", nil, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel(map[string]string{"app": "nobody"})}},
	}}})
	block := pol("x", "block", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{PolicyTypes: egress, Egress: []networkingv1.NetworkPolicyEgressRule{{
		To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "100.64.0.1/16", Except: []string{"100.64.2.0/24"}}}},
	}, {
		To: []networkingv1.NetworkPolicyPeer{{PodSelector: sel(map[string]string{"app": "b"})}},
	}}})
	end := int32(5010)
	ranges := pol("x", "ranges", map[string]string{"app": "b"}, networkingv1.NetworkPolicySpec{PolicyTypes: egress, Egress: []networkingv1.NetworkPolicyEgressRule{{
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &intstr.IntOrString{IntVal: 5000}, EndPort: &end}, port(intstr.FromInt32(5005), &udp), port(intstr.FromInt32(53), &tcp)},
	}}})
	hostSel := pol("x", "host", nil, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel(map[string]string{"ns": "y"})}},
	}}})

	badSel := pol("x", "bad", nil, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{}}})
	badSel.Spec.PodSelector = metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Sometimes"}}}

	for _, tc := range []struct {
		name  string
		pols  []*networkingv1.NetworkPolicy
		check func(t *testing.T, rs *Ruleset)
	}{
		{"no policy: every local address known, none isolated", nil, func(t *testing.T, rs *Ruleset) {
			if got := elems(rs, "local-v4"); !slices.Equal(got, []string{"100.64.1.2", "100.64.1.3"}) {
				t.Errorf("local-v4 = %v", got)
			}
			if got := elems(rs, "ingress-v4"); got != nil {
				t.Errorf("ingress map = %v, want empty", got)
			}
		}},
		{"deny all ingress: a jump to an empty policy chain, then the drop", []*networkingv1.NetworkPolicy{denyAll}, func(t *testing.T, rs *Ruleset) {
			chain := podChain(podA, dirIn)
			want := []string{"ct state invalid goto ingress-drop", "ip saddr 100.64.1.2 accept", "ip6 saddr fd00:64:1::2 accept", "jump " + pk(denyAll) + "-in", `counter name "` + pk(denyAll) + `-in-denied"`, "goto ingress-drop"}
			if !slices.Equal(rs.Chains[chain], want) {
				t.Errorf("pod chain = %q, want %q", rs.Chains[chain], want)
			}
			if rules := rs.Chains[pk(denyAll)+"-in"]; len(rules) != 0 {
				t.Errorf("policy chain = %q, want empty", rules)
			}
			if v := rs.Sets["ingress-v6"].Elems["fd00:64:1::2"]; v != "goto "+chain {
				t.Errorf("ingress-v6[a] = %q", v)
			}
			if _, ok := rs.Sets["ingress-v4"].Elems["100.64.1.3"]; ok {
				t.Error("b is isolated by a policy that does not select it")
			}
			if _, ok := rs.Chains[podChain(podA, dirEg)]; ok {
				t.Error("an ingress policy isolates egress")
			}
			if c := rs.Counters[pk(denyAll)+"-in-denied"]; c != "x/deny ingress" {
				t.Errorf("per-policy counter comment %q, want the policy and direction", c)
			}
		}},
		{"namespace and pod selector together: y/c only, not the hostNetwork pod", []*networkingv1.NetworkPolicy{fromC}, func(t *testing.T, rs *Ruleset) {
			if got := elems(rs, pk(fromC)+"-in0-v4"); !slices.Equal(got, []string{"100.64.2.2"}) {
				t.Errorf("peers = %v", got)
			}
			if got := elems(rs, pk(fromC)+"-in0-v6"); !slices.Equal(got, []string{"fd00:64:2::2"}) {
				t.Errorf("peers v6 = %v", got)
			}
		}},
		{"named port resolved per receiving pod", []*networkingv1.NetworkPolicy{named}, func(t *testing.T, rs *Ruleset) {
			want := []string{"100.64.1.2 . tcp . 8080", "100.64.1.3 . tcp . 9090"}
			if got := elems(rs, pk(named)+"-in0-named-v4"); !slices.Equal(got, want) {
				t.Errorf("named = %v, want %v (never the union of numbers)", got, want)
			}
			if got := rs.Chains[pk(named)+"-in"]; !slices.Contains(got, "ip daddr . meta l4proto . th dport @"+pk(named)+"-in0-named-v4 accept") {
				t.Errorf("policy chain = %q", got)
			}
		}},
		{"a peer selector matching nothing allows nothing", []*networkingv1.NetworkPolicy{nothing}, func(t *testing.T, rs *Ruleset) {
			if got := rs.Chains[pk(nothing)+"-in"]; len(got) != 0 {
				t.Errorf("policy chain = %q, want no rule", got)
			}
			if len(rs.Chains[podChain(podA, dirIn)]) != 6 {
				t.Errorf("a is not isolated: %q", rs.Chains[podChain(podA, dirIn)])
			}
		}},
		{"ipBlock except narrows its peer only; non-canonical CIDR", []*networkingv1.NetworkPolicy{block}, func(t *testing.T, rs *Ruleset) {
			want := []string{"100.64.0.0/23", "100.64.3.0-100.64.255.255"}
			if got := elems(rs, pk(block)+"-eg0-v4"); !slices.Equal(got, want) {
				t.Errorf("block = %v, want %v", got, want)
			}
			if got := elems(rs, pk(block)+"-eg1-v4"); !slices.Equal(got, []string{"100.64.1.3"}) {
				t.Errorf("second rule = %v: the except must not reach it", got)
			}
			if _, ok := rs.Sets[pk(block)+"-eg0-v6"]; ok {
				t.Error("an IPv4 block made an IPv6 set")
			}
		}},
		{"port ranges merged, per protocol", []*networkingv1.NetworkPolicy{ranges}, func(t *testing.T, rs *Ruleset) {
			want := []string{"tcp . 53", "udp . 5000-5010"}
			if got := elems(rs, pk(ranges)+"-eg0-ports"); !slices.Equal(got, want) {
				t.Errorf("ports = %v, want %v", got, want)
			}
		}},
		{"hostNetwork pods are never peers", []*networkingv1.NetworkPolicy{hostSel}, func(t *testing.T, rs *Ruleset) {
			if got := elems(rs, pk(hostSel)+"-in0-v4"); !slices.Equal(got, []string{"100.64.2.2"}) {
				t.Errorf("peers = %v", got)
			}
		}},
		{"a selector that cannot be parsed isolates its namespace, allows nothing", []*networkingv1.NetworkPolicy{badSel}, func(t *testing.T, rs *Ruleset) {
			for _, p := range []*Pod{podA, podB} {
				for _, dir := range []string{dirIn, dirEg} {
					if _, ok := rs.Chains[podChain(p, dir)]; !ok {
						t.Errorf("%s not isolated (%s)", p.Key(), dir)
					}
				}
			}
			if got := rs.Chains[pk(badSel)+"-in"]; len(got) != 0 {
				t.Errorf("policy chain %q, want no rule", got)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, _ := Compile(state(tc.pols...))
			tc.check(t, rs)
			// Whatever it renders, the fake kernel takes it.
			fake := knftables.NewFake(knftables.InetFamily, TableName)
			if err := NewTable(fake).Apply(context.Background(), rs); err != nil {
				t.Fatalf("apply: %v", err)
			}
		})
	}
}

// TestApplyDiff: changing the table step by step ends where building it
// from nothing does, whatever the steps.
func TestApplyDiff(t *testing.T) {
	ctx := context.Background()
	p1 := pol("x", "p1", map[string]string{"app": "a"}, networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel(map[string]string{"app": "b"})}}}}})
	p2 := pol("x", "p2", nil, networkingv1.NetworkPolicySpec{PolicyTypes: egress, Egress: []networkingv1.NetworkPolicyEgressRule{{
		Ports: []networkingv1.NetworkPolicyPort{port(intstr.FromString("http"), &tcp)}}}})
	steps := [][]*networkingv1.NetworkPolicy{nil, {p1}, {p1, p2}, {p2}, {p1}, nil, {p2}}
	inc := knftables.NewFake(knftables.InetFamily, TableName)
	tbl := NewTable(inc)
	for i, s := range steps {
		rs, _ := Compile(state(s...))
		if err := tbl.Apply(ctx, rs); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		fresh := knftables.NewFake(knftables.InetFamily, TableName)
		if err := NewTable(fresh).Apply(ctx, rs); err != nil {
			t.Fatalf("step %d fresh: %v", i, err)
		}
		if got, want := inc.Dump(), fresh.Dump(); got != want {
			t.Fatalf("step %d: changed table differs from a fresh one:\n--- changed\n%s\n--- fresh\n%s", i, got, want)
		}
		// A restart (a new Table on the same kernel table) converges too.
		again := NewTable(inc)
		if err := again.Apply(ctx, rs); err != nil {
			t.Fatalf("step %d rebuild: %v", i, err)
		}
		if got, want := inc.Dump(), fresh.Dump(); got != want {
			t.Fatalf("step %d: rebuilt table differs:\n%s\nvs\n%s", i, got, want)
		}
	}
	if !strings.Contains(inc.Dump(), "pod-") {
		t.Error("last step isolates nothing")
	}
}
