package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/api"
)

// Ruleset is the table's content: the sets, maps and chains Render made,
// by name. Base chains are fixed (see baseChains); their rules are here.
type Ruleset struct {
	Sets   map[string]*Set
	Chains map[string][]string
	// Counters are named counters (name → comment): the drops by reason,
	// and per policy the packets it denied (see podChains).
	Counters map[string]string
}

// Set is a set or, with Map, a verdict map.
type Set struct {
	Type    string
	Flags   []knftables.SetFlag
	Map     bool
	Comment string
	// Elems maps each key to its value ("" in a set).
	Elems map[string]string
}

// Direction names.
const (
	dirIn = "in"
	dirEg = "eg"
)

// family is one address family's nftables words.
type family struct {
	name, match, addrType string
}

var families = []family{{"v4", "ip", "ipv4_addr"}, {"v6", "ip6", "ipv6_addr"}}

func familyOf(a netip.Addr) family {
	if a.Is4() {
		return families[0]
	}
	return families[1]
}

// Names of the fixed objects.
const (
	chainEgress    = "egress"
	chainIngress   = "ingress"
	chainEgDrop    = "egress-drop"
	chainInDrop    = "ingress-drop"
	chainUnattDrop = "unattached-drop"
)

func localSet(f family) string  { return "local-" + f.name }
func subnetSet(f family) string { return "subnets-" + f.name }
func vmapName(dir string, f family) string {
	return map[string]string{dirIn: "ingress-", dirEg: "egress-"}[dir] + f.name
}
func dropChain(dir string) string {
	if dir == dirIn {
		return chainInDrop
	}
	return chainEgDrop
}

// id is a short stable name for an object key: nftables names stay short
// and free of the characters Kubernetes names may hold.
func id(key string) string {
	h := sha256.Sum256([]byte(key))
	return hex.EncodeToString(h[:6])
}

func policyKey(p *networkingv1.NetworkPolicy) string { return p.Namespace + "/" + p.Name }

// types returns whether p isolates for ingress and egress.
func policyTypes(p *networkingv1.NetworkPolicy) (in, eg bool) {
	if len(p.Spec.PolicyTypes) == 0 {
		return true, len(p.Spec.Egress) > 0
	}
	return slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeIngress), slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
}

// compiler holds one Compile's state.
type compiler struct {
	s      *State
	rs     *Ruleset
	report *api.PolicyStatus
	rules  []ruleReport
}

// Compile turns the state into the table's content and a report of what
// each local pod is allowed, and of what could not be enforced.
func Compile(s *State) (*Ruleset, *api.PolicyStatus) {
	c := &compiler{s: s, rs: &Ruleset{Sets: map[string]*Set{}, Chains: map[string][]string{}, Counters: map[string]string{}}, report: &api.PolicyStatus{Enabled: true}}
	c.base()
	local := s.localPods()
	type sel struct {
		pol    *networkingv1.NetworkPolicy
		in, eg bool
		pods   []*Pod
	}
	// The policies that select a local pod; the others do nothing here.
	var sels []sel
	bySel := map[string][]*networkingv1.NetworkPolicy{}
	pols := slices.Clone(s.Policies)
	slices.SortFunc(pols, func(a, b *networkingv1.NetworkPolicy) int { return strings.Compare(policyKey(a), policyKey(b)) })
	for _, p := range pols {
		ps, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
		if err != nil {
			// The API validates selectors; one that still fails isolates
			// every pod of its namespace, both ways, and allows nothing:
			// less, never more (reported).
			c.problem(p, "podSelector: %v; isolating every pod of the namespace, allowing nothing", err)
			ps = labels.Everything()
			q := *p
			q.Spec = networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}}
			p = &q
		}
		in, eg := policyTypes(p)
		var pods []*Pod
		for _, pod := range local {
			if pod.Namespace == p.Namespace && !pod.HostNetwork && ps.Matches(labels.Set(pod.Labels)) {
				pods = append(pods, pod)
				bySel[pod.Key()] = append(bySel[pod.Key()], p)
			}
		}
		if len(pods) > 0 {
			sels = append(sels, sel{p, in, eg, pods})
		}
	}
	for _, sl := range sels {
		if sl.in {
			c.policyChain(sl.pol, dirIn, sl.pods)
		}
		if sl.eg {
			c.policyChain(sl.pol, dirEg, sl.pods)
		}
	}
	for _, pod := range local {
		c.podChains(pod, bySel[pod.Key()])
	}
	return c.rs, c.report
}

func (c *compiler) problem(p *networkingv1.NetworkPolicy, format string, a ...any) {
	c.report.Problems = append(c.report.Problems, api.PolicyProblem{Policy: policyKey(p), Message: fmt.Sprintf(format, a...)})
}

func (c *compiler) set(name string, s *Set) *Set {
	if old, ok := c.rs.Sets[name]; ok {
		return old
	}
	if s.Elems == nil {
		s.Elems = map[string]string{}
	}
	c.rs.Sets[name] = s
	return s
}

// base adds the fixed sets and the base chains' rules.
func (c *compiler) base() {
	for _, f := range families {
		c.set(localSet(f), &Set{Type: f.addrType, Comment: "addresses of the pods attached on this node"})
		sub := c.set(subnetSet(f), &Set{Type: f.addrType, Flags: []knftables.SetFlag{knftables.IntervalFlag}, Comment: "this node's pod subnets"})
		for _, p := range c.s.Subnets {
			if familyOf(p.Addr()) == f {
				sub.Elems[p.Masked().String()] = ""
			}
		}
		for _, dir := range []string{dirIn, dirEg} {
			c.set(vmapName(dir, f), &Set{Type: f.addrType + " : verdict", Map: true, Comment: "isolated local pods: address to pod chain"})
		}
	}
	for _, dir := range []string{dirEg, dirIn} {
		field, chain := "saddr", chainEgress
		if dir == dirIn {
			field, chain = "daddr", chainIngress
		}
		rules := []string{
			"ct state established,related accept",
			// Neighbour discovery is link-local plumbing, not a connection.
			"meta l4proto ipv6-icmp icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept",
		}
		for _, f := range families {
			rules = append(rules, fmt.Sprintf("%s %s @%s %s %s != @%s goto %s", f.match, field, subnetSet(f), f.match, field, localSet(f), chainUnattDrop))
		}
		for _, f := range families {
			rules = append(rules, fmt.Sprintf("%s %s vmap @%s", f.match, field, vmapName(dir, f)))
		}
		c.rs.Chains[chain] = rules
	}
	for reason, chain := range DropChains {
		c.rs.Counters[chain] = "packets dropped: " + reason
		c.rs.Chains[chain] = []string{fmt.Sprintf("counter name %q drop", chain)}
	}
}

// DropChains are the drop chains by reason; each counts into the named
// counter of its own name.
var DropChains = map[string]string{"ingress": chainInDrop, "egress": chainEgDrop, "unattached": chainUnattDrop}

// PolicyCounterPrefix begins the names of the per-policy drop counters;
// their comment is "<namespace>/<name> <direction>".
const PolicyCounterPrefix = "pol-"

func podChain(p *Pod, dir string) string { return "pod-" + id(p.Key()) + "-" + dir }
func polChain(p *networkingv1.NetworkPolicy, dir string) string {
	return "pol-" + id(policyKey(p)) + "-" + dir
}

// podChains adds every local pod's address to the local sets and, for an
// isolated pod, its chains and map entries.
func (c *compiler) podChains(pod *Pod, pols []*networkingv1.NetworkPolicy) {
	rep := api.PodPolicy{Pod: pod.Key()}
	addrs := c.s.localAddrs(pod)
	for _, a := range addrs {
		c.rs.Sets[localSet(familyOf(a))].Elems[a.String()] = ""
		rep.IPs = append(rep.IPs, a)
	}
	for _, dir := range []string{dirIn, dirEg} {
		var jumps []string
		for _, p := range pols {
			in, eg := policyTypes(p)
			if dir == dirIn && in || dir == dirEg && eg {
				jumps = append(jumps, "jump "+polChain(p, dir))
				if !slices.Contains(rep.Policies, policyKey(p)) {
					rep.Policies = append(rep.Policies, policyKey(p))
				}
			}
		}
		if jumps == nil {
			continue
		}
		if dir == dirIn {
			rep.IngressIsolated = true
		} else {
			rep.EgressIsolated = true
		}
		name := podChain(pod, dir)
		rules := []string{"ct state invalid goto " + dropChain(dir)}
		// A pod reaching itself through a Service (hairpin: kube-proxy
		// sends it back to its own address) is not traffic between pods:
		// no policy has to allow it, as in Cilium.
		self := "saddr"
		if dir == dirEg {
			self = "daddr"
		}
		for _, a := range addrs {
			rules = append(rules, fmt.Sprintf("%s %s %s accept", familyOf(a).match, self, a))
		}
		rules = append(rules, jumps...)
		// Every policy isolating the pod counts what it denies: a drop
		// counts once per policy that isolates the pod (bounded labels:
		// policies, never pods or addresses).
		for _, p := range pols {
			if in, eg := policyTypes(p); dir == dirIn && in || dir == dirEg && eg {
				ctr := polChain(p, dir) + "-denied"
				c.rs.Counters[ctr] = policyKey(p) + " " + map[string]string{dirIn: "ingress", dirEg: "egress"}[dir]
				rules = append(rules, fmt.Sprintf("counter name %q", ctr))
			}
		}
		c.rs.Chains[name] = append(rules, "goto "+dropChain(dir))
		for _, a := range addrs {
			c.rs.Sets[vmapName(dir, familyOf(a))].Elems[a.String()] = "goto " + name
		}
	}
	for _, r := range c.rules {
		if slices.Contains(r.selected, pod.Key()) {
			if r.direction == "ingress" {
				rep.Ingress = append(rep.Ingress, r.PolicyRule)
			}
			if r.direction == "egress" {
				rep.Egress = append(rep.Egress, r.PolicyRule)
			}
		}
	}
	c.report.Pods = append(c.report.Pods, rep)
}

// selector converts an API label selector.
func selector(ls *metav1.LabelSelector) (labels.Selector, error) {
	return metav1.LabelSelectorAsSelector(ls)
}

// peerPods returns the pods a peer's selectors match (nil selectors: the
// policy's namespace, every pod).
func (c *compiler) peerPods(pol *networkingv1.NetworkPolicy, peer networkingv1.NetworkPolicyPeer) ([]*Pod, error) {
	var nsSel, podSel labels.Selector = nil, labels.Everything()
	var err error
	if peer.NamespaceSelector != nil {
		if nsSel, err = selector(peer.NamespaceSelector); err != nil {
			return nil, fmt.Errorf("namespaceSelector: %w", err)
		}
	}
	if peer.PodSelector != nil {
		if podSel, err = selector(peer.PodSelector); err != nil {
			return nil, fmt.Errorf("podSelector: %w", err)
		}
	}
	var out []*Pod
	for _, p := range c.s.Pods {
		if p.HostNetwork || len(p.IPs) == 0 {
			continue
		}
		if nsSel == nil {
			if p.Namespace != pol.Namespace {
				continue
			}
		} else {
			nsLabels, ok := c.s.Namespaces[p.Namespace]
			if !ok || !nsSel.Matches(labels.Set(nsLabels)) {
				continue
			}
		}
		if podSel.Matches(labels.Set(p.Labels)) {
			out = append(out, p)
		}
	}
	return out, nil
}

// blockSpans returns an ipBlock's addresses: the CIDR without its
// exceptions (which narrow this peer only, never the policy).
func blockSpans(b *networkingv1.IPBlock) ([]span, error) {
	p, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return nil, fmt.Errorf("ipBlock.cidr %q: %w", b.CIDR, err)
	}
	spans := []span{prefixSpan(p)}
	var cut []span
	for _, e := range b.Except {
		ep, err := netip.ParsePrefix(e)
		if err != nil {
			return nil, fmt.Errorf("ipBlock.except %q: %w", e, err)
		}
		cut = append(cut, prefixSpan(ep))
	}
	return subtract(spans, cut), nil
}

func inSpans(a netip.Addr, s []span) bool {
	for _, x := range s {
		if x.lo.BitLen() == a.BitLen() && !a.Less(x.lo) && !x.hi.Less(a) {
			return true
		}
	}
	return false
}

// protoWord is the nftables name of a protocol ("" for one it cannot
// match).
func protoWord(p *corev1.Protocol) string {
	if p == nil {
		return "tcp"
	}
	switch *p {
	case corev1.ProtocolTCP, "":
		return "tcp"
	case corev1.ProtocolUDP:
		return "udp"
	case corev1.ProtocolSCTP:
		return "sctp"
	}
	return ""
}

// policyChain renders one direction of a policy: a rule (per family) for
// each of its rules, accepting what the rule allows.
func (c *compiler) policyChain(pol *networkingv1.NetworkPolicy, dir string, selected []*Pod) {
	name := polChain(pol, dir)
	var rules []string
	type polRule struct {
		peers []networkingv1.NetworkPolicyPeer
		ports []networkingv1.NetworkPolicyPort
	}
	var prs []polRule
	if dir == dirIn {
		for _, r := range pol.Spec.Ingress {
			prs = append(prs, polRule{r.From, r.Ports})
		}
	} else {
		for _, r := range pol.Spec.Egress {
			prs = append(prs, polRule{r.To, r.Ports})
		}
	}
	peerField, direction := "saddr", "ingress"
	if dir == dirEg {
		peerField, direction = "daddr", "egress"
	}
	for i, pr := range prs {
		rep := api.PolicyRule{Policy: policyKey(pol)}
		base := fmt.Sprintf("pol-%s-%s%d", id(policyKey(pol)), dir, i)
		anyPeer := len(pr.peers) == 0
		var peerSpans []span
		var peerPods []*Pod // pods among the peers, for named ports
		var blocks []span
		bad := false
		for _, peer := range pr.peers {
			if peer.IPBlock != nil {
				s, err := blockSpans(peer.IPBlock)
				if err != nil {
					c.problem(pol, "%s rule %d: %v", direction, i, err)
					bad = true
					continue
				}
				peerSpans = append(peerSpans, s...)
				blocks = append(blocks, s...)
				continue
			}
			pods, err := c.peerPods(pol, peer)
			if err != nil {
				c.problem(pol, "%s rule %d: %v", direction, i, err)
				bad = true
				continue
			}
			peerPods = append(peerPods, pods...)
			for _, p := range pods {
				for _, a := range p.IPs {
					peerSpans = append(peerSpans, span{a, a})
				}
			}
		}
		peerSpans = merge(peerSpans)
		if anyPeer {
			rep.Peers = []string{"any"}
		}
		for _, s := range peerSpans {
			rep.Peers = append(rep.Peers, s.String())
		}
		if bad && len(peerSpans) == 0 && !anyPeer {
			rep.Peers = append(rep.Peers, "(none: see problems)")
		}
		// Ports: numbers (and ranges) as one set of protocol . port;
		// names resolved per pod that holds them, as address . protocol .
		// port: the pod receiving (ingress) or the peer (egress).
		var numeric []string
		named := map[family][]string{}
		anyPort := len(pr.ports) == 0
		for _, pp := range pr.ports {
			proto := protoWord(pp.Protocol)
			if proto == "" {
				c.problem(pol, "%s rule %d: protocol %q is not one nftables can match; the rule allows nothing on it", direction, i, *pp.Protocol)
				continue
			}
			switch {
			case pp.Port == nil:
				numeric = append(numeric, proto+" . 0-65535")
				rep.Ports = append(rep.Ports, proto+"/any")
			case pp.Port.Type == intstr.Int:
				lo := pp.Port.IntVal
				if pp.EndPort != nil && *pp.EndPort > lo {
					numeric = append(numeric, fmt.Sprintf("%s . %d-%d", proto, lo, *pp.EndPort))
					rep.Ports = append(rep.Ports, fmt.Sprintf("%s/%d-%d", proto, lo, *pp.EndPort))
				} else {
					numeric = append(numeric, proto+" . "+strconv.Itoa(int(lo)))
					rep.Ports = append(rep.Ports, fmt.Sprintf("%s/%d", proto, lo))
				}
			default:
				holders := selected
				if dir == dirEg {
					holders = peerPods
					if anyPeer || len(blocks) > 0 {
						holders = nil
						for _, p := range c.s.Pods {
							if p.HostNetwork {
								continue
							}
							for _, a := range p.IPs {
								if anyPeer || inSpans(a, blocks) {
									holders = append(holders, p)
									break
								}
							}
						}
						holders = append(holders, peerPods...)
					}
				}
				rep.Ports = append(rep.Ports, proto+"/"+pp.Port.StrVal)
				for _, h := range holders {
					for _, np := range h.Ports {
						if np.Name != pp.Port.StrVal || protoWord(&np.Protocol) != proto {
							continue
						}
						addrs := h.IPs
						if dir == dirIn {
							addrs = c.s.localAddrs(h)
						}
						for _, a := range addrs {
							named[familyOf(a)] = append(named[familyOf(a)], fmt.Sprintf("%s . %s . %d", a, proto, np.Port))
						}
					}
				}
			}
		}
		rr := ruleReport{PolicyRule: rep, direction: direction}
		for _, p := range selected {
			rr.selected = append(rr.selected, p.Key())
		}
		c.rules = append(c.rules, rr)
		var numSet string
		if len(numeric) > 0 {
			numSet = base + "-ports"
			s := c.set(numSet, &Set{Type: "inet_proto . inet_service", Flags: []knftables.SetFlag{knftables.IntervalFlag}, Comment: policyKey(pol) + " " + direction + " ports"})
			for _, e := range mergePorts(numeric) {
				s.Elems[e] = ""
			}
		}
		for _, f := range families {
			var match string
			if !anyPeer {
				var fs []span
				for _, s := range peerSpans {
					if s.lo.BitLen() == map[string]int{"v4": 32, "v6": 128}[f.name] {
						fs = append(fs, s)
					}
				}
				if len(fs) == 0 {
					continue // no peer of this family: the rule allows nothing in it
				}
				set := fmt.Sprintf("%s-%s", base, f.name)
				s := c.set(set, &Set{Type: f.addrType, Flags: []knftables.SetFlag{knftables.IntervalFlag}, Comment: policyKey(pol) + " " + direction + " peers"})
				for _, x := range fs {
					s.Elems[x.String()] = ""
				}
				match = fmt.Sprintf("%s %s @%s ", f.match, peerField, set)
			}
			if anyPort {
				rules = append(rules, match+"accept")
				continue
			}
			if numSet != "" {
				rules = append(rules, fmt.Sprintf("%smeta l4proto . th dport @%s accept", match, numSet))
			}
			if els := named[f]; len(els) > 0 {
				set := fmt.Sprintf("%s-named-%s", base, f.name)
				s := c.set(set, &Set{Type: f.addrType + " . inet_proto . inet_service", Comment: policyKey(pol) + " " + direction + " named ports"})
				for _, e := range els {
					s.Elems[e] = ""
				}
				// The pod holding the name is the packet's destination
				// either way: the receiving pod, or the egress peer.
				rules = append(rules, fmt.Sprintf("%s%s daddr . meta l4proto . th dport @%s accept", match, f.match, set))
			}
		}
	}
	c.rs.Chains[name] = rules
}

// mergePorts joins the protocol . port elements of one set so that none
// overlap (an interval set takes no overlaps).
func mergePorts(elems []string) []string {
	byProto := map[string][][2]int{}
	for _, e := range elems {
		proto, ports, _ := strings.Cut(e, " . ")
		lo, hi, ok := strings.Cut(ports, "-")
		l, _ := strconv.Atoi(lo)
		h := l
		if ok {
			h, _ = strconv.Atoi(hi)
		}
		byProto[proto] = append(byProto[proto], [2]int{l, h})
	}
	var out []string
	for proto, rs := range byProto {
		slices.SortFunc(rs, func(a, b [2]int) int { return a[0] - b[0] })
		merged := [][2]int{rs[0]}
		for _, r := range rs[1:] {
			last := &merged[len(merged)-1]
			if r[0] <= last[1]+1 {
				last[1] = max(last[1], r[1])
				continue
			}
			merged = append(merged, r)
		}
		for _, r := range merged {
			if r[0] == r[1] {
				out = append(out, fmt.Sprintf("%s . %d", proto, r[0]))
			} else {
				out = append(out, fmt.Sprintf("%s . %d-%d", proto, r[0], r[1]))
			}
		}
	}
	slices.Sort(out)
	return out
}

// ruleReport is a rule as reported, with the pods it was rendered for.
type ruleReport struct {
	api.PolicyRule
	direction string
	selected  []string
}
