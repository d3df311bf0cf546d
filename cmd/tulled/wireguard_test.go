package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/internal/tstest/wggo"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/local"
)

// wgNetConf is the test network with WireGuard on its default port.
const wgNetConf = `{"Network":"100.96.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64,"Backend":{"Type":"wireguard","PersistentKeepalive":"0s"}}`

// capture runs tcpdump on n's interface dev into a file until stop.
func capture(t *testing.T, n *cluster.Node, dev string) (stop func() []byte) {
	t.Helper()
	f := t.TempDir() + "/" + dev + ".pcap"
	cmd := n.Command(context.Background(), "tcpdump", "-Z", "root", "--immediate-mode", "-i", dev, "-U", "-s", "0", "-w", f)
	var stderr lockedBuffer // tcpdump writes it while this reads
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// tcpdump says when it listens.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(stderr.String(), "listening"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("tcpdump on %s did not start: %s", dev, stderr.String())
		}
	}
	return func() []byte {
		time.Sleep(200 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

// lockedBuffer is a bytes.Buffer safe for one writer and one reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// sendMarker sends a recognisable payload over TCP from → to's pod address.
func sendMarker(t *testing.T, from, to *cluster.Node, dst string, marker []byte) {
	t.Helper()
	ln, err := to.Listen(net.JoinHostPort(dst, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- nil
			return
		}
		defer c.Close()
		var b bytes.Buffer
		b.ReadFrom(c)
		done <- b.Bytes()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		c.Write(marker)
	}
	c.Close()
	if got := <-done; !bytes.Contains(got, marker) {
		t.Fatalf("the marker did not arrive (%d bytes)", len(got))
	}
}

func wgStatus(t *testing.T, n *cluster.Node) *api.Status {
	t.Helper()
	s, err := n.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.WireGuard == nil {
		t.Fatalf("%s: status has no WireGuard identity", n.Name)
	}
	return s
}

// TestWireGuard: three nodes with WireGuard, over an IPv4 and an IPv6
// underlay: every peer is reached over WireGuard, pings and checksummed
// TCP transfers of both inner families arrive, the underlay carries no
// plaintext (a capture there holds no byte of a marker that a capture on
// the receiving TUN does see), the status shows each peer's key
// fingerprint and handshake, and the key survives a restart.
func TestWireGuard(t *testing.T) {
	for _, tt := range []struct {
		name string
		v6   bool
	}{{"IPv4 underlay", false}, {"IPv6 underlay", true}} {
		t.Run(tt.name, func(t *testing.T) {
			c := startCluster(t, 3, cluster.Options{NetConf: wgNetConf, IPv6Underlay: tt.v6})
			a, b := c.Nodes[0], c.Nodes[1]
			for _, n := range c.Nodes {
				for p, be := range backends(t, n) {
					if be != "wireguard" {
						t.Fatalf("%s → %s: %q, want wireguard", n.Name, p, be)
					}
				}
			}
			pingAll(t, c.Nodes)
			for _, v6 := range []bool{false, true} {
				if tt.v6 && !v6 {
					continue // the IPv4 inner family was carried above
				}
				sent, got := transfer(t, a, b, addr(t, b, v6), 100<<20, 0)
				if sent != got {
					t.Fatalf("transfer (inner IPv6 %v) corrupted", v6)
				}
			}
			marker := []byte(fmt.Sprintf("tulle-plaintext-marker-%d-%s", time.Now().UnixNano(), strings.Repeat("x", 200)))
			under, inner := capture(t, b, b.Link), capture(t, b, "tulle0")
			sendMarker(t, a, b, addr(t, b, false).String(), marker)
			if u, i := under(), inner(); !bytes.Contains(i, marker) {
				t.Logf("captures: underlay %d bytes, tun %d bytes", len(u), len(i))
				t.Fatal("the capture on the receiving TUN does not see the marker: the test proves nothing")
			} else if bytes.Contains(u, marker[:24]) {
				t.Fatal("the marker crossed the underlay in plaintext")
			}
			// Identities and sessions in the status.
			fp := map[string]string{}
			for _, n := range c.Nodes {
				fp[n.Name] = wgStatus(t, n).WireGuard.Fingerprint
			}
			sa := wgStatus(t, a)
			for _, p := range sa.Peers {
				if p.WireGuard == nil || p.WireGuard.Fingerprint != fp[p.Name] {
					t.Errorf("%s: peer %s shows key %+v, want fingerprint %s", a.Name, p.Name, p.WireGuard, fp[p.Name])
				} else if p.WireGuard.LastHandshake.IsZero() {
					t.Errorf("%s: no handshake with %s", a.Name, p.Name)
				}
			}
			for _, k := range []string{"wg_drop_auth", "wg_drop_replay", "wg_drop_malformed", "wg_drop_not_ip", "drop_spoofed"} {
				if v := counter(t, b, k); v != 0 {
					t.Errorf("%s: %s = %d", b.Name, k, v)
				}
			}
			// An initiation can arrive before its sender's lease does (the
			// nodes start together): dropped, then answered by the
			// handshake the receiver offers when it learns of the peer.
			if v := counter(t, b, "wg_drop_unknown_key"); v > 2 {
				t.Errorf("%s: wg_drop_unknown_key = %d, want at most one per peer at start", b.Name, v)
			}
			// The udp backend does not even run on a WireGuard node: its
			// counter is absent from the status (or, from tulleds before
			// the backend table, zero).
			if s, err := b.Status(context.Background()); err != nil {
				t.Fatal(err)
			} else if v := s.Counters["datagrams_out"]; v != 0 {
				t.Errorf("%d udp (plaintext) datagrams left a WireGuard node", v)
			}
			// The key is the node's identity: 0600, and the same after a restart.
			fi, err := os.Stat(a.WireGuardKey())
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("key file: %v, mode %v", err, fi.Mode())
			}
			if err := a.Stop(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := a.Start(); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if err := a.WaitPeers(ctx, 2); err != nil {
				t.Fatal(err)
			}
			if got := wgStatus(t, a).WireGuard.Fingerprint; got != fp[a.Name] {
				t.Errorf("key changed across a restart: %s, was %s", got, fp[a.Name])
			}
			ping(t, a, addr(t, b, false))
			ping(t, b, addr(t, a, true))
		})
	}
}

// wgGo is a stock wireguard-go device on a test node, configured with wg.
type wgGo struct {
	node *topo.Node
	proc *wggo.Proc
	priv string // key file
	pub  string
}

func startWGGo(t *testing.T, n *topo.Node, name string) *wgGo {
	t.Helper()
	testenv.RequireTools(t, "wg", "go")
	bin, err := wggo.Build(context.Background(), wgGoDir(t), tulled(t))
	if err != nil {
		t.Fatal(err)
	}
	p, err := wggo.Start(n.Command, bin, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop() })
	w := &wgGo{node: n, proc: p, priv: filepath.Join(t.TempDir(), name+".key")}
	priv, err := n.Run("wg", "genkey")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(w.priv, []byte(priv), 0o600)
	k, err := wireguard.ParseKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	w.pub = k.Public().String()
	return w
}

var (
	wgGoOnce sync.Once
	wgGoD    string
)

// wgGoDir is where wireguard-go is built, once per test binary.
func wgGoDir(t *testing.T) string {
	wgGoOnce.Do(func() { wgGoD, _ = os.MkdirTemp("", "wggo-") })
	return wgGoD
}

// run runs wg or ip commands in the device's namespace.
func (w *wgGo) run(t *testing.T, cmds ...[]string) {
	t.Helper()
	for _, c := range cmds {
		if out, err := w.node.Run(c[0], c[1:]...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
}

// TestInteropWireGuardGo: a node run by the stock wireguard-go, configured
// with wg and published as a lease, and two tulled nodes exchange pings
// and checksummed TCP both ways and both inner families; tulled rekeys
// every second under traffic; either side restarted, traffic resumes.
func TestInteropWireGuardGo(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{NetConf: wgNetConf, Args: []string{"--wireguard-rekey-after", "1s"}})
	a, b := c.Nodes[0], c.Nodes[1]
	tn, err := c.Topo.AddNode()
	if err != nil {
		t.Fatal(err)
	}
	w := startWGGo(t, tn, "twgi"+c.Topo.Suffix)
	// The wireguard-go node's lease, as a tulled would publish it.
	nc, err := netconf.Parse([]byte(wgNetConf))
	if err != nil {
		t.Fatal(err)
	}
	st, err := local.New(local.Options{Dir: c.LeaseDir(), Net: nc, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	caps := map[string]encap.Capability{wireguard.Name: wireguard.Caps{Port: 51820, PublicKey: w.pub}}
	l, err := st.Claim(ctx, "wggo", lease.Attrs{PublicIP: tn.IP4, Backend: lease.Backend{Type: netconf.BackendWireGuard, Port: 51820}, Backends: encap.Publish(caps)})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitPeers(ctx, 2); err != nil {
		t.Fatal(err)
	}
	own4, own6 := l.Subnet.Addr(), l.IPv6Subnet.Addr()
	configure := func() {
		args := []string{"wg", "set", w.proc.Name, "private-key", w.priv, "listen-port", "51820"}
		for _, n := range c.Nodes {
			s := wgStatus(t, n)
			subnets, _ := n.Subnets(ctx)
			var allowed []string
			for _, p := range subnets {
				allowed = append(allowed, p.String())
			}
			args = append(args, "peer", s.WireGuard.PublicKey, "endpoint", fmt.Sprintf("%s:51820", n.IP4), "allowed-ips", strings.Join(allowed, ","))
		}
		w.run(t, args,
			[]string{"ip", "addr", "add", own4.String() + "/32", "dev", w.proc.Name},
			[]string{"ip", "-6", "addr", "add", own6.String() + "/128", "dev", w.proc.Name, "nodad"},
			[]string{"ip", "link", "set", w.proc.Name, "mtu", "1440", "up"},
			[]string{"ip", "route", "add", nc.Network.String(), "dev", w.proc.Name, "src", own4.String()},
			[]string{"ip", "-6", "route", "add", nc.IPv6Network.String(), "dev", w.proc.Name, "src", own6.String()})
	}
	configure()
	wn := &cluster.Node{Node: tn}
	talk := func(when string) {
		t.Helper()
		for _, v6 := range []bool{false, true} {
			own := own4
			if v6 {
				own = own6
			}
			ping(t, a, own)
			ping(t, b, own)
			dst := addr(t, a, v6)
			if out, err := tn.Run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "3", dst.String()); err != nil {
				t.Fatalf("%s: ping %s from wireguard-go: %v\n%s", when, dst, err, out)
			}
		}
	}
	talk("first contact")
	before := counter(t, a, "wg_handshakes_completed")
	for _, pair := range [][2]*cluster.Node{{a, wn}, {wn, a}} {
		for _, v6 := range []bool{false, true} {
			dst := own4
			if v6 {
				dst = own6
			}
			if pair[1] == a {
				dst = addr(t, a, v6)
			}
			r, err := cluster.Transfer(ctx, pair[0], pair[1], dst, 40<<20, 3*time.Second)
			if err != nil || !r.Intact() {
				t.Fatalf("transfer to %s: %v (intact %v)", dst, err, r.Intact())
			}
		}
	}
	// Rekeyed after 1 s, at most once per RekeyTimeout (5 s).
	if got := counter(t, a, "wg_handshakes_completed") - before; got < 2 {
		t.Errorf("%d handshakes during 12 s of traffic with a 1 s rekey", got)
	}
	if v := counter(t, a, "wg_drop_auth"); v != 0 {
		t.Errorf("wg_drop_auth = %d", v)
	}
	// tulled restarts (its sessions are gone): the first packet either
	// way sets up a new one.
	if err := a.Stop(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	if err := a.WaitPeers(ctx, 2); err != nil {
		t.Fatal(err)
	}
	// wireguard-go speaks first: its old session is unknown to the new
	// process, which offered a new one at start.
	if out, err := tn.Run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", addr(t, a, false).String()); err != nil {
		t.Fatalf("after tulled restarted: ping from wireguard-go: %v\n%s", err, out)
	}
	talk("after tulled restarted")
	// wireguard-go restarts: a new device, configured again.
	w.proc.Stop()
	p, err := wggo.Start(tn.Command, filepath.Join(wgGoDir(t), "wireguard"), w.proc.Name)
	if err != nil {
		t.Fatal(err)
	}
	w.proc = p
	t.Cleanup(func() { p.Stop() })
	configure()
	// As WireGuard recovers: the restarted side, without a session,
	// initiates on its first packet.
	for _, n := range c.Nodes {
		if out, err := tn.Run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", addr(t, n, false).String()); err != nil {
			t.Fatalf("after wireguard-go restarted: ping %s from it: %v\n%s", n.Name, err, out)
		}
	}
	talk("after wireguard-go restarted")
}

// TestWireGuardDevice: a node whose WireGuard is a device tulled
// programs through wgctrl (here the stock wireguard-go standing in for
// the kernel's, which this machine lacks: the same calls, over its UAPI
// socket) and two nodes with tulled's own WireGuard form one cluster.
func TestWireGuardDevice(t *testing.T) {
	var w *wgGo
	c := startTopologyWith(t, topo.Options{Nodes: 3}, cluster.Options{NetConf: wgNetConf}, func(c *cluster.Cluster) {
		w = startWGGo(t, c.Nodes[0].Node, "twgd"+c.Topo.Suffix)
		c.Nodes[0].Extra = []string{"--wireguard-device", w.proc.Name}
	})
	a, b := c.Nodes[0], c.Nodes[1]
	if m := wgStatus(t, a).WireGuard.Mode; m != "kernel" {
		t.Fatalf("%s: WireGuard mode %q, want the device (kernel)", a.Name, m)
	}
	if m := wgStatus(t, b).WireGuard.Mode; m != "userspace" {
		t.Fatalf("%s: WireGuard mode %q, want userspace", b.Name, m)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		s := wgStatus(t, a)
		if s.NotReady == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready: %s", a.Name, s.NotReady)
		}
	}
	pingAll(t, c.Nodes)
	for _, pair := range [][2]*cluster.Node{{a, b}, {b, a}} {
		r, err := cluster.Transfer(ctx, pair[0], pair[1], addr(t, pair[1], false), 30<<20, 0)
		if err != nil || !r.Intact() {
			t.Fatalf("transfer %s → %s: %v", pair[0].Name, pair[1].Name, err)
		}
	}
	out, err := a.Run("wg", "show", w.proc.Name, "peers")
	if err != nil || strings.Count(strings.TrimSpace(out), "\n") != 1 {
		t.Errorf("device peers: %v %q, want two", err, out)
	}
	s := wgStatus(t, a)
	for _, p := range s.Peers {
		if p.WireGuard == nil || p.WireGuard.LastHandshake.IsZero() || p.WireGuard.RxBytes == 0 {
			t.Errorf("%s: peer %s state %+v", a.Name, p.Name, p.WireGuard)
		}
	}
	// The device's routes are tulle's; a restart keeps them and the
	// sessions (nothing is replaced).
	routes, _ := a.Run("ip", "route", "show", "dev", w.proc.Name, "proto", "116")
	if strings.Count(routes, "\n") != 2 {
		t.Errorf("routes on the device: %q, want one per peer's IPv4 subnet", routes)
	}
	hs := map[string]time.Time{}
	for _, p := range s.Peers {
		hs[p.Name] = p.WireGuard.LastHandshake
	}
	aAddr := addr(t, a, false)
	if err := a.Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ping(t, b, aAddr) // the device carries on without tulled
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	if err := a.WaitPeers(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for _, p := range wgStatus(t, a).Peers {
		if !p.WireGuard.LastHandshake.Equal(hs[p.Name]) && p.WireGuard.LastHandshake.Before(hs[p.Name]) {
			t.Errorf("peer %s: handshake went back in time", p.Name)
		}
	}
	pingAll(t, c.Nodes)
}

// probes sends a numbered UDP datagram every interval from → dst (on to)
// until stop, and reports how many were lost and the longest gap between
// two that arrived.
type probes struct {
	sent, got int
	gap       time.Duration
	done      chan struct{}
}

func startProbes(t *testing.T, from, to *cluster.Node, dst netip.Addr, interval time.Duration, stop <-chan struct{}) *probes {
	t.Helper()
	var rc, sc *net.UDPConn
	if err := to.Do(func() (err error) {
		rc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := from.Do(func() (err error) {
		sc, err = net.DialUDP("udp", nil, rc.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	p := &probes{done: make(chan struct{})}
	seen := map[uint64]bool{}
	go func() {
		defer close(p.done)
		var last time.Time
		buf := make([]byte, 64)
		for {
			rc.SetReadDeadline(time.Now().Add(time.Second))
			n, err := rc.Read(buf)
			if err != nil {
				return
			}
			if n == 8 && !seen[binary.BigEndian.Uint64(buf)] {
				seen[binary.BigEndian.Uint64(buf)] = true
				now := time.Now()
				if !last.IsZero() && now.Sub(last) > p.gap {
					p.gap = now.Sub(last)
				}
				last = now
				p.got++
			}
		}
	}()
	go func() {
		defer sc.Close()
		tk := time.NewTicker(interval)
		defer tk.Stop()
		var b [8]byte
		for seq := uint64(0); ; seq++ {
			select {
			case <-stop:
				time.Sleep(100 * time.Millisecond)
				rc.Close()
				return
			case <-tk.C:
			}
			binary.BigEndian.PutUint64(b[:], seq)
			sc.Write(b[:])
			p.sent++
		}
	}()
	return p
}

// TestKeyRotation: a node rotates its WireGuard key while two-way UDP
// probes run every 2 ms. The new key is in the key file (0600) and in the
// peers' view at once; sessions carry on meanwhile, the next handshakes
// use the new key, and the longest interruption either way stays far
// below one handshake retry (RekeyTimeout, 5 s).
func TestKeyRotation(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{NetConf: wgNetConf, Args: []string{"--wireguard-rekey-after", "1s"}})
	a, b := c.Nodes[0], c.Nodes[1]
	ping(t, a, addr(t, b, false))
	oldFP := wgStatus(t, a).WireGuard.Fingerprint
	oldFile, _ := os.ReadFile(a.WireGuardKey())
	stop := make(chan struct{})
	ab := startProbes(t, a, b, addr(t, b, false), 2*time.Millisecond, stop)
	ba := startProbes(t, b, a, addr(t, a, false), 2*time.Millisecond, stop)
	time.Sleep(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	k, err := api.RotateKey(ctx, filepath.Join(a.RunDir, api.SocketName), false)
	if err != nil {
		t.Fatal(err)
	}
	if k.Fingerprint == oldFP {
		t.Fatal("the key did not change")
	}
	hsBefore := counter(t, b, "wg_handshakes_completed") + counter(t, a, "wg_handshakes_completed")
	// The peer learns the new key from the lease.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if p := wgStatus(t, b).Peers; len(p) == 1 && p[0].WireGuard != nil && p[0].WireGuard.Fingerprint == k.Fingerprint {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never saw %s's new key", b.Name, a.Name)
		}
	}
	// Handshakes with the new key (the 1 s rekey, at most one per 5 s).
	for deadline := time.Now().Add(15 * time.Second); counter(t, b, "wg_handshakes_completed")+counter(t, a, "wg_handshakes_completed") < hsBefore+2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no handshake after the rotation")
		}
	}
	close(stop)
	<-ab.done
	<-ba.done
	t.Logf("probes a→b: %d sent, %d arrived, longest gap %s; b→a: %d sent, %d arrived, longest gap %s", ab.sent, ab.got, ab.gap, ba.sent, ba.got, ba.gap)
	for _, p := range []*probes{ab, ba} {
		if p.sent-p.got > 5 || p.gap > 200*time.Millisecond {
			t.Errorf("interrupted: %d of %d probes lost, longest gap %s", p.sent-p.got, p.sent, p.gap)
		}
	}
	if got := wgStatus(t, a).WireGuard.Fingerprint; got != k.Fingerprint {
		t.Errorf("status shows %s, want the new %s", got, k.Fingerprint)
	}
	newFile, _ := os.ReadFile(a.WireGuardKey())
	fi, _ := os.Stat(a.WireGuardKey())
	if bytes.Equal(newFile, oldFile) || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file not rewritten (mode %v)", fi.Mode())
	}
	if v := counter(t, a, "wg_drop_auth") + counter(t, b, "wg_drop_auth") + counter(t, a, "wg_drop_mac1") + counter(t, b, "wg_drop_mac1"); v != 0 {
		t.Errorf("%d handshake messages refused during the rotation", v)
	}
	// The new key survives a restart.
	if err := a.Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	if err := a.WaitPeers(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if got := wgStatus(t, a).WireGuard.Fingerprint; got != k.Fingerprint {
		t.Errorf("after a restart: %s, want %s", got, k.Fingerprint)
	}
	// b's session died with a's process: the first packets trigger the
	// handshake that replaces it (a round trip, longer on a loaded machine).
	var out string
	for try := 0; try < 5; try++ {
		if out, err = b.Run("ping", "-n", "-c", "1", "-W", "1", addr(t, a, false).String()); err == nil {
			break
		}
	}
	if err != nil {
		t.Errorf("no ping through after the restart with the new key (5 tries): %v\n%s", err, out)
	}
	// After a leak: rotate-key --now retires the old key at once; b
	// learns the new one from the lease and traffic flows.
	k2, err := api.RotateKey(ctx, filepath.Join(a.RunDir, api.SocketName), true)
	if err != nil {
		t.Fatal(err)
	}
	if k2.OldKeyGrace != 0 {
		t.Errorf("rotate-key --now leaves the old key %s of grace", k2.OldKeyGrace)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if p := wgStatus(t, b).Peers; len(p) == 1 && p[0].WireGuard != nil && p[0].WireGuard.Fingerprint == k2.Fingerprint {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never saw %s's new key", b.Name, a.Name)
		}
	}
	ping(t, b, addr(t, a, false))
}
