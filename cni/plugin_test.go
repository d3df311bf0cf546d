package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// env is one "node" namespace with a tulled-like run dir, and helpers to
// make pod namespaces.
type env struct {
	t      *testing.T
	node   string // namespace the plugin runs in
	runDir string
	data   string
	sub    *api.SubnetFile
}

func newEnv(t *testing.T, subnet string) *env {
	t.Helper()
	testenv.Require(t, topo.Require())
	testenv.RequireTools(t, "nft")
	e := &env{t: t, node: "tullecni-" + randSuffix() + "-node", runDir: t.TempDir(), data: t.TempDir()}
	run(t, "ip", "netns", "add", e.node)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", e.node).Run() })
	run(t, "ip", "-n", e.node, "link", "set", "lo", "up")
	e.sub = &api.SubnetFile{
		Network: netip.MustParsePrefix("100.96.0.0/12"), Subnet: netip.MustParsePrefix(subnet),
		IPv6Network: netip.MustParsePrefix("fd00:96::/56"), IPv6Subnet: netip.MustParsePrefix("fd00:96:0:5::/64"),
		MTU: 1456,
	}
	if err := api.WriteSubnetFile(e.runDir, e.sub); err != nil {
		t.Fatal(err)
	}
	return e
}

func randSuffix() string {
	b := make([]byte, 3)
	f, _ := os.Open("/dev/urandom")
	f.Read(b)
	f.Close()
	return fmt.Sprintf("%x", b)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// pod creates a pod namespace and returns its path.
func (e *env) pod() string {
	name := "tullecni-" + randSuffix() + "-pod"
	run(e.t, "ip", "netns", "add", name)
	e.t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/run/netns/" + name
}

func (e *env) conf(ver string, extra string) []byte {
	return []byte(fmt.Sprintf(`{"cniVersion":%q,"name":"tulle-test","type":"tulle","runDir":%q,"dataDir":%q%s}`, ver, e.runDir, e.data, extra))
}

func args(netns, id string, conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: id, Netns: netns, IfName: "eth0", StdinData: conf}
}

// in runs fn inside the node namespace, as a runtime would run the plugin.
func (e *env) in(fn func() error) error { return topo.DoIn(e.node, fn) }

func (e *env) add(a *skel.CmdArgs) (types.Result, error) {
	var res types.Result
	err := e.in(func() (err error) { res, err = Add(a); return err })
	return res, err
}

func (e *env) del(a *skel.CmdArgs) error   { return e.in(func() error { return Del(a) }) }
func (e *env) check(a *skel.CmdArgs) error { return e.in(func() error { return Check(a) }) }

func code(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

func TestAddCheckDelEveryVersion(t *testing.T) {
	for _, ver := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(ver, func(t *testing.T) {
			e := newEnv(t, "100.96.5.0/24")
			netns := e.pod()
			conf := e.conf(ver, "")
			r, err := e.add(args(netns, "c1", conf))
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if r.Version() != ver {
				t.Errorf("result version %s, want %s", r.Version(), ver)
			}
			res, err := current.NewResultFromResult(r)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.IPs) != 2 || !e.sub.Subnet.Contains(addrOf(res.IPs[0].Address)) || !e.sub.IPv6Subnet.Contains(addrOf(res.IPs[1].Address)) {
				t.Fatalf("IPs %v not one from each node subnet", res.IPs)
			}
			if got := res.IPs[0].Gateway.String(); got != "100.96.5.1" {
				t.Errorf("IPv4 gateway %s, want 100.96.5.1", got)
			}
			podNS := filepath.Base(netns)
			out := run(t, "ip", "-n", podNS, "route", "show", "default")
			if !strings.Contains(out, "via 100.96.5.1") {
				t.Errorf("pod default route: %q", out)
			}
			if out := run(t, "ip", "-n", podNS, "link", "show", "eth0"); !strings.Contains(out, "mtu 1456") {
				t.Errorf("pod MTU not tulled's: %s", out)
			}
			// The pod reaches its gateway (the bridge) over both families.
			run(t, "ip", "netns", "exec", podNS, "ping", "-c", "1", "-W", "2", "100.96.5.1")
			run(t, "ip", "netns", "exec", podNS, "ping", "-6", "-c", "1", "-W", "2", "fd00:96:0:5::1")
			if out := run(t, "ip", "netns", "exec", e.node, "nft", "list", "table", "inet", "tulle_tulle_test"); !strings.Contains(out, "ip saddr 100.96.5.0/24 ip daddr != 100.96.0.0/12 masquerade") {
				t.Errorf("masquerade rule missing:\n%s", out)
			}
			if ok, _ := version.GreaterThanOrEqualTo(ver, "0.4.0"); ok {
				prev, _ := json.Marshal(r)
				checkConf := e.conf(ver, `,"prevResult":`+string(prev))
				if err := e.check(args(netns, "c1", checkConf)); err != nil {
					t.Errorf("CHECK: %v", err)
				}
				// CHECK notices a missing address.
				run(t, "ip", "-n", podNS, "addr", "flush", "dev", "eth0", "scope", "global")
				if err := e.check(args(netns, "c1", checkConf)); err == nil {
					t.Error("CHECK passed with the pod's addresses gone")
				}
			}
			if err := e.del(args(netns, "c1", conf)); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if out, err := exec.Command("ip", "-n", podNS, "link", "show", "eth0").CombinedOutput(); err == nil {
				t.Errorf("pod eth0 survived DEL: %s", out)
			}
			if n := allocations(t, e); n != 0 {
				t.Errorf("%d allocations survived DEL", n)
			}
			if err := e.del(args(netns, "c1", conf)); err != nil {
				t.Errorf("second DEL: %v", err)
			}
			// DEL with the pod namespace already gone.
			if err := e.del(args("/run/netns/does-not-exist", "c1", conf)); err != nil {
				t.Errorf("DEL without netns: %v", err)
			}
		})
	}
}

func addrOf(n net.IPNet) netip.Addr {
	a, _ := netip.AddrFromSlice(n.IP)
	return a.Unmap()
}

// allocations counts the IPAM address files.
func allocations(t *testing.T, e *env) int {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(e.data, "tulle-test"))
	n := 0
	for _, x := range ents {
		if net.ParseIP(x.Name()) != nil {
			n++
		}
	}
	return n
}

// hostVeths lists the veths on the node's bridge.
func hostVeths(t *testing.T, e *env) []string {
	t.Helper()
	out, _ := exec.Command("ip", "-n", e.node, "-o", "link", "show", "master", DefaultBridge).CombinedOutput()
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	return names
}

func TestAddErrorsLeaveNothing(t *testing.T) {
	// A /29 has 5 pod addresses: .0 is tulled's, .1 the gateway, .7 broadcast.
	e := newEnv(t, "100.96.5.0/29")
	conf := e.conf("1.1.0", "")
	for i := range 5 {
		if _, err := e.add(args(e.pod(), fmt.Sprintf("c%d", i), conf)); err != nil {
			t.Fatalf("ADD %d: %v", i, err)
		}
	}
	tests := []struct {
		name  string
		netns string
		conf  []byte
		setup func()
		code  uint
	}{
		{"exhausted subnet", e.pod(), conf, nil, ErrSubnetExhausted},
		{"missing netns", "/run/netns/tullecni-nope", conf, nil, types.ErrInvalidNetNS},
		{"malformed JSON", e.pod(), []byte(`{"cniVersion":`), nil, types.ErrDecodingFailure},
		{"no name", e.pod(), []byte(`{"cniVersion":"1.1.0","type":"tulle"}`), nil, types.ErrInvalidNetworkConfig},
		{"bad mtu", e.pod(), e.conf("1.1.0", `,"mtu":20`), nil, types.ErrInvalidNetworkConfig},
		{"tulled has no lease", e.pod(), conf, func() { os.Remove(filepath.Join(e.runDir, api.SubnetFileName)) }, types.ErrTryAgainLater},
	}
	before, beforeVeths := allocations(t, e), len(hostVeths(t, e))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup()
			}
			_, err := e.add(args(tt.netns, "bad", tt.conf))
			if code(err) != tt.code {
				t.Fatalf("ADD = %v (code %d), want code %d", err, code(err), tt.code)
			}
			if n := allocations(t, e); n != before {
				t.Errorf("allocations %d → %d", before, n)
			}
			if n := len(hostVeths(t, e)); n != beforeVeths {
				t.Errorf("host veths %d → %d", beforeVeths, n)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	e := newEnv(t, "100.96.5.0/24")
	conf := e.conf("1.1.0", "")
	status := func() error { return Status(&skel.CmdArgs{StdinData: conf}) }
	// subnet.json present, no tulled socket: limited connectivity.
	if err := status(); code(err) != types.ErrLimitedConnectivity {
		t.Errorf("STATUS without tulled = %v, want code 51", err)
	}
	// A tulled answering on its socket: available.
	ln, err := net.Listen("unix", filepath.Join(e.runDir, api.SocketName))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(api.Status{Node: "n1"})
	})}
	go srv.Serve(ln)
	defer srv.Close()
	if err := status(); err != nil {
		t.Errorf("STATUS with tulled = %v, want nil", err)
	}
	// No lease: not available.
	os.Remove(filepath.Join(e.runDir, api.SubnetFileName))
	if err := status(); code(err) != types.ErrPluginNotAvailable {
		t.Errorf("STATUS without lease = %v, want code 50", err)
	}
	if err := Status(&skel.CmdArgs{StdinData: []byte(`{`)}); code(err) != types.ErrDecodingFailure {
		t.Errorf("STATUS with bad config = %v", err)
	}
}

func TestGC(t *testing.T) {
	e := newEnv(t, "100.96.5.0/24")
	conf := e.conf("1.1.0", "")
	for _, id := range []string{"keep", "gone1", "gone2"} {
		if _, err := e.add(args(e.pod(), id, conf)); err != nil {
			t.Fatal(err)
		}
	}
	// A crashed runtime also leaves an allocation without any link.
	if err := e.in(func() error {
		m, err := openIPAM(mustConf(t, conf), e.sub)
		if err != nil {
			return err
		}
		defer m.close()
		_, err = m.allocate("orphan", "eth0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n := allocations(t, e); n != 8 {
		t.Fatalf("%d allocations before GC, want 8", n)
	}
	macBefore := run(t, "ip", "-n", e.node, "-br", "link", "show", DefaultBridge)
	gcConf := e.conf("1.1.0", `,"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]`)
	if err := e.in(func() error { return GC(&skel.CmdArgs{StdinData: gcConf}) }); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if n := allocations(t, e); n != 2 {
		t.Errorf("%d allocations after GC, want 2 (keep's IPv4 and IPv6)", n)
	}
	if v := hostVeths(t, e); len(v) != 1 || v[0] != hostVethName("keep", "eth0") {
		t.Errorf("host veths after GC: %v, want only keep's", v)
	}
	// Removing ports must not change the bridge's MAC (pods' gateway ARP).
	if macAfter := run(t, "ip", "-n", e.node, "-br", "link", "show", DefaultBridge); strings.Fields(macAfter)[2] != strings.Fields(macBefore)[2] {
		t.Errorf("bridge MAC changed: %s → %s", strings.Fields(macBefore)[2], strings.Fields(macAfter)[2])
	}
}

func mustConf(t *testing.T, b []byte) *NetConf {
	t.Helper()
	c, err := LoadConf(b)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLoadConf(t *testing.T) {
	c, err := LoadConf([]byte(`{"cniVersion":"1.1.0","name":"n","type":"tulle"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.RunDir != DefaultRunDir || c.Bridge != DefaultBridge || c.DataDir != DefaultDataDir || !c.ipMasq() || !c.hairpin() {
		t.Errorf("defaults not applied: %+v", c)
	}
	for _, bad := range []string{`{"name":"a/b"}`, `{"name":"n","bridge":"far-too-long-bridge"}`, `{"name":"n","mtu":70000}`} {
		if _, err := LoadConf([]byte(bad)); code(err) != types.ErrInvalidNetworkConfig {
			t.Errorf("LoadConf(%s) = %v, want code 7", bad, err)
		}
	}
	if n := hostVethName("abc", "eth0"); len(n) != 14 || n != hostVethName("abc", "eth0") || n == hostVethName("abc", "eth1") {
		t.Errorf("hostVethName not stable, unique and 14 characters: %s", n)
	}
}

// TestRepeatedAdd plays a runtime that retries ADD: a live attachment keeps
// its addresses and gets its result back; a broken one makes ADD fail
// without freeing anything; a failing ADD of another pod frees only its own.
func TestRepeatedAdd(t *testing.T) {
	e := newEnv(t, "100.96.5.0/24")
	conf := e.conf("1.1.0", "")
	netns := e.pod()
	r1, err := e.add(args(netns, "c1", conf))
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	first, _ := current.NewResultFromResult(r1)

	r2, err := e.add(args(netns, "c1", conf))
	if err != nil {
		t.Fatalf("repeated ADD of a live attachment: %v", err)
	}
	again, _ := current.NewResultFromResult(r2)
	if len(again.IPs) != 2 || again.IPs[0].Address.String() != first.IPs[0].Address.String() || again.IPs[1].Address.String() != first.IPs[1].Address.String() {
		t.Errorf("repeated ADD returned %v, want the live %v", again.IPs, first.IPs)
	}
	if len(again.Interfaces) != 3 || again.Interfaces[2].Mac != first.Interfaces[2].Mac || again.Interfaces[2].Sandbox != netns {
		t.Errorf("repeated ADD interfaces %+v, want %+v", again.Interfaces, first.Interfaces)
	}
	if n := allocations(t, e); n != 2 {
		t.Errorf("allocations after a repeated ADD: %d, want 2", n)
	}
	podNS := filepath.Base(netns)
	run(t, "ip", "netns", "exec", podNS, "ping", "-c", "1", "-W", "2", "100.96.5.1")

	// Another pod whose ADD fails half-way (its namespace already has an
	// eth0) frees its own addresses and leaves c1's alone.
	other := e.pod()
	run(t, "ip", "-n", filepath.Base(other), "link", "add", "eth0", "type", "veth", "peer", "name", "x0")
	if _, err := e.add(args(other, "c2", conf)); err == nil {
		t.Fatal("ADD into a namespace that already has eth0 succeeded")
	}
	if n := allocations(t, e); n != 2 {
		t.Errorf("allocations after a failed ADD of another pod: %d, want c1's 2", n)
	}
	if v := hostVeths(t, e); len(v) != 1 {
		t.Errorf("host veths after a failed ADD: %v, want c1's only", v)
	}

	// c1 broken (addresses gone): ADD fails, naming the problem, and frees
	// nothing.
	run(t, "ip", "-n", podNS, "addr", "flush", "dev", "eth0", "scope", "global")
	_, err = e.add(args(netns, "c1", conf))
	if err == nil || !strings.Contains(err.Error(), "not intact") {
		t.Fatalf("ADD of a broken attachment = %v, want a 'not intact' error", err)
	}
	if n := allocations(t, e); n != 2 {
		t.Errorf("allocations after ADD of a broken attachment: %d, want 2", n)
	}
	if v := hostVeths(t, e); len(v) != 1 {
		t.Errorf("host veths after ADD of a broken attachment: %v, want 1", v)
	}
	// DEL then ADD repairs it.
	if err := e.del(args(netns, "c1", conf)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.add(args(netns, "c1", conf)); err != nil {
		t.Fatalf("ADD after DEL: %v", err)
	}
}

// TestBridgeNetfilter: the bridge hands what it switches to netfilter's
// IP hooks by its own nf_call_iptables/ip6tables, with the namespace's
// net.bridge.bridge-nf-call-* sysctls off (as some distributions ship
// them), and every ADD restores them when something turned them off.
// Pod → ClusterIP → pod on one node depends on it (kube-proxy's reverse
// NAT); the real cluster's test checks that end to end.
func TestBridgeNetfilter(t *testing.T) {
	e := newEnv(t, "100.96.5.0/24")
	if _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); err != nil {
		testenv.Skip(t, "br_netfilter is not loaded on this machine: %v", err)
	}
	run(t, "ip", "netns", "exec", e.node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0")
	flags := func() string {
		t.Helper()
		return strings.TrimSpace(run(t, "ip", "netns", "exec", e.node, "sh", "-c",
			"cat /sys/class/net/"+DefaultBridge+"/bridge/nf_call_iptables /sys/class/net/"+DefaultBridge+"/bridge/nf_call_ip6tables | tr '\\n' ' '"))
	}
	conf := e.conf("1.0.0", "")
	if _, err := e.add(args(e.pod(), "c1", conf)); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if got := flags(); got != "1 1" {
		t.Errorf("bridge nf_call_iptables, nf_call_ip6tables = %q after ADD, want \"1 1\"", got)
	}
	run(t, "ip", "-n", e.node, "link", "set", DefaultBridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0")
	if got := flags(); got != "0 0" {
		t.Fatalf("could not turn the flags off to test their repair: %q", got)
	}
	if _, err := e.add(args(e.pod(), "c2", conf)); err != nil {
		t.Fatalf("second ADD: %v", err)
	}
	if got := flags(); got != "1 1" {
		t.Errorf("bridge flags %q after the next ADD, want \"1 1\" again", got)
	}
}
