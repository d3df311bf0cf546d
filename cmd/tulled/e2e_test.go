package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/testenv"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

var (
	buildOnce sync.Once
	tulledBin string
	buildErr  error
)

// requireNetns skips tests that need root and network namespaces.
func requireNetns(t *testing.T) {
	t.Helper()
	testenv.Require(t, topo.Require())
	testenv.RequireTools(t, "ping")
}

// tulled builds the daemon once per test binary.
func tulled(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tulled-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		tulledBin = filepath.Join(dir, "tulled")
		out, err := exec.Command("go", "build", "-o", tulledBin, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return tulledBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if tulledBin != "" {
		os.RemoveAll(filepath.Dir(tulledBin))
	}
	os.Exit(code)
}

// startCluster builds n namespaces and runs tulled in each; everything is
// removed when the test ends, also on failure.
func startCluster(t *testing.T, n int, opt cluster.Options) *cluster.Cluster {
	t.Helper()
	return startTopology(t, topo.Options{Nodes: n}, opt)
}

// startTopology is startCluster on any topology.
func startTopology(t *testing.T, to topo.Options, opt cluster.Options) *cluster.Cluster {
	t.Helper()
	return startTopologyWith(t, to, opt, nil)
}

// startTopologyWith runs before (if set) on the built cluster, then
// starts it.
func startTopologyWith(t *testing.T, to topo.Options, opt cluster.Options, before func(*cluster.Cluster)) *cluster.Cluster {
	t.Helper()
	requireNetns(t)
	opt.Tulled = tulled(t)
	opt.Dir = t.TempDir()
	c, err := cluster.Build(to, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseFor(t) })
	if before != nil {
		before(c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func addr(t *testing.T, n *cluster.Node, v6 bool) netip.Addr {
	t.Helper()
	a, err := n.Addr(context.Background(), v6)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func ping(t *testing.T, from *cluster.Node, to netip.Addr) {
	t.Helper()
	if out, err := from.Run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", to.String()); err != nil {
		t.Errorf("ping %s from %s failed: %v\n%s", to, from.Name, err, out)
	}
}

func counter(t *testing.T, n *cluster.Node, name string) uint64 {
	t.Helper()
	s, err := n.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	v, ok := s.Counters[name]
	if !ok {
		t.Fatalf("no counter %q", name)
	}
	return v
}

func waitCounter(t *testing.T, n *cluster.Node, name string, atLeast uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for counter(t, n, name) < atLeast {
		if time.Now().After(deadline) {
			t.Fatalf("%s: counter %s = %d, want ≥ %d", n.Name, name, counter(t, n, name), atLeast)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// transfer runs cluster.Transfer and fails the test on error.
func transfer(t *testing.T, from, to *cluster.Node, dst netip.Addr, size int64, pace time.Duration) (sent, got [32]byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := cluster.Transfer(ctx, from, to, dst, size, pace)
	if err != nil {
		t.Error(err)
	}
	return r.Sent, r.Received
}

func TestThreeNodes(t *testing.T) {
	c := startCluster(t, 3, cluster.Options{})
	ns := c.Nodes

	t.Run("ping all pairs IPv4 and IPv6", func(t *testing.T) {
		for _, from := range ns {
			for _, to := range ns {
				if from != to {
					ping(t, from, addr(t, to, false))
					ping(t, from, addr(t, to, true))
				}
			}
		}
	})

	t.Run("200 MB TCP transfer intact", func(t *testing.T) {
		sent, got := transfer(t, ns[0], ns[1], addr(t, ns[1], false), 200<<20, 0)
		if sent != got {
			t.Fatalf("checksum mismatch: sent %x, received %x", sent, got)
		}
	})

	t.Run("datagrams from a non-peer are dropped and counted", func(t *testing.T) {
		intruder, err := c.Topo.AddNode()
		if err != nil {
			t.Fatal(err)
		}
		before := counter(t, ns[0], "drop_unknown_source")
		// A well-formed tulle datagram carrying a packet for n1's subnet.
		pkt := ipv4Packet(intruder.IP4, addr(t, ns[0], false), 17, 32)
		d := append([]byte{0x11, 2, 0, 0, 0, 1, 0, 0}, pkt...)
		err = intruder.Do(func() error {
			conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: ns[0].IP4.AsSlice(), Port: 8285})
			if err != nil {
				return err
			}
			defer conn.Close()
			for range 5 {
				if _, err := conn.Write(d); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		waitCounter(t, ns[0], "drop_unknown_source", before+5)
	})

	t.Run("spoofed inner sources are dropped and counted", func(t *testing.T) {
		before := counter(t, ns[1], "drop_spoofed")
		// n1 sends packets whose source lies in n3's subnet to n2: n1's
		// kernel routes them into tulle0, n1's tulled forwards them, n2
		// must refuse them because n1 does not own that source.
		spoofSrc := addr(t, ns[2], false).Next()
		pkt := ipv4Packet(spoofSrc, addr(t, ns[1], false), 17, 32)
		err := ns[0].Do(func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			to := &unix.SockaddrInet4{Addr: addr(t, ns[1], false).As4()}
			for range 3 {
				if err := unix.Sendto(fd, pkt, 0, to); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		waitCounter(t, ns[1], "drop_spoofed", before+3)
	})

	t.Run("a peer that leaves is removed from every table", func(t *testing.T) {
		leave(t, ns[2])
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		for _, n := range ns[:2] {
			if err := n.WaitPeers(ctx, 1); err != nil {
				t.Fatal(err)
			}
		}
		if out, err := ns[2].Run("ip", "link", "show", "tulle0"); err == nil {
			t.Errorf("cleanup left tulle0 behind: %s", out)
		}
	})
}

// ipv4Packet builds an IPv4 packet with a valid header checksum.
func ipv4Packet(src, dst netip.Addr, proto byte, payload int) []byte {
	p := make([]byte, 20+payload)
	p[0], p[8], p[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(p[10:], ^uint16(sum))
	if proto == 17 {
		binary.BigEndian.PutUint16(p[20:], 40000)
		binary.BigEndian.PutUint16(p[22:], 9)
		binary.BigEndian.PutUint16(p[24:], uint16(payload))
	}
	return p
}

func TestRestartDuringTransfer(t *testing.T) {
	for _, tc := range []struct {
		name, netConf string
		sig           syscall.Signal
	}{
		{"udp", cluster.DefaultNetConf, syscall.SIGTERM}, {"udp", cluster.DefaultNetConf, syscall.SIGKILL},
		// The restarted node has the same key and no sessions: it offers
		// new ones at start, and answers data on the old ones with one.
		{"wireguard", wgNetConf, syscall.SIGTERM}, {"wireguard", wgNetConf, syscall.SIGKILL},
	} {
		sig := tc.sig
		t.Run(tc.name+" "+sig.String(), func(t *testing.T) {
			c := startCluster(t, 2, cluster.Options{NetConf: tc.netConf})
			a, b := c.Nodes[0], c.Nodes[1]
			dst := addr(t, b, false)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			tr := cluster.StartTransfer(ctx, a, b, dst, 200<<20, 4*time.Second)
			if err := tr.WaitReceived(ctx, 20<<20); err != nil {
				t.Fatal(err)
			}
			if err := b.Stop(sig); err != nil {
				t.Fatal(err)
			}
			if out, err := b.Run("ip", "route", "show", "dev", "tulle0"); err != nil || !strings.Contains(out, "100.96.0.0/12") {
				t.Fatalf("after %v the route via tulle0 is gone: %v %s", sig, err, out)
			}
			restart := time.Now()
			if err := b.Start(); err != nil {
				t.Fatal(err)
			}
			if err := b.WaitPeers(context.Background(), 1); err != nil {
				t.Fatal(err)
			}
			t.Logf("tulled back with its peer %v after the %v restart", time.Since(restart).Round(time.Millisecond), sig)
			r, err := tr.Wait()
			if err != nil {
				t.Fatalf("transfer across the restart: %v", err)
			}
			if !r.Intact() {
				t.Fatalf("checksum mismatch after restart: sent %x, received %x", r.Sent, r.Received)
			}
			if got := addr(t, b, false); got != dst {
				t.Errorf("restart changed the subnet: %s → %s", dst, got)
			}
			if tc.name == "wireguard" {
				if s, err := b.Status(ctx); err != nil || s.WireGuard == nil || s.Lease.Backend != "wireguard" {
					t.Errorf("after the restart: %v %+v", err, s)
				}
			}
		})
	}
}

func TestIPv6Underlay(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{IPv6Underlay: true})
	a, b := c.Nodes[0], c.Nodes[1]
	ping(t, a, addr(t, b, false))
	ping(t, b, addr(t, a, true))
	s, err := a.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Peers) != 1 || !s.Peers[0].Endpoint.Addr().Is6() {
		t.Fatalf("peer not reached over IPv6: %+v", s.Peers)
	}
	if s.MTU != 1500-40-8-16 {
		t.Errorf("MTU over an IPv6 underlay = %d, want %d", s.MTU, 1500-40-8-16)
	}
	sent, got := transfer(t, a, b, addr(t, b, true), 50<<20, 0)
	if sent != got {
		t.Fatal("checksum mismatch over the IPv6 underlay")
	}
}

func TestSelfHealing(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	a, b := c.Nodes[0], c.Nodes[1]
	for _, cmd := range [][]string{
		{"ip", "route", "del", "100.96.0.0/12", "dev", "tulle0"},
		{"ip", "-6", "route", "del", "fd00:96::/56", "dev", "tulle0"},
		{"ip", "addr", "flush", "dev", "tulle0", "scope", "global"},
		{"ip", "link", "set", "tulle0", "down"},
		{"ip", "link", "set", "tulle0", "mtu", "9000"},
	} {
		if out, err := a.Run(cmd[0], cmd[1:]...); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			route, _ := a.Run("ip", "route", "show", "dev", "tulle0")
			route6, _ := a.Run("ip", "-6", "route", "show", "dev", "tulle0")
			link, _ := a.Run("ip", "link", "show", "tulle0")
			if strings.Contains(route, "100.96.0.0/12") && strings.Contains(route6, "fd00:96::/56") && strings.Contains(link, ",UP") && strings.Contains(link, "mtu 1456") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after %v, not repaired within 10s:\n%s%s%s", cmd, route, route6, link)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ping(t, a, addr(t, b, false))
	ping(t, a, addr(t, b, true))
}

func TestBadConfigCreatesNothing(t *testing.T) {
	requireNetns(t)
	bin := tulled(t)
	tp, err := topo.New(topo.Options{Nodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	n := tp.Nodes[0]
	dir := t.TempDir()
	good := cluster.DefaultNetConf
	wgConf := `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","Mode":"userspace"}}`
	badKey, openKey := filepath.Join(dir, "bad.key"), filepath.Join(dir, "open.key")
	os.WriteFile(badKey, []byte("AAAA\n"), 0o600)
	os.WriteFile(openKey, []byte("qPPSp3eTaUQyAtk3jPRAA6eFtR9CAqQQ6XtWfCg8CX8=\n"), 0o644)
	tests := []struct {
		name    string
		netConf string
		args    []string
		want    string
	}{
		{"bad field", `{"Network":"100.96.0.0/12","SubnetLen":"24"}`, nil, "SubnetLen"},
		{"unknown backend", `{"Network":"100.96.0.0/12","Backend":{"Type":"ipip"}}`, nil, "Backend.Type"},
		{"no such interface", good, []string{"--iface", "nope0"}, "--iface"},
		{"address not local", good, []string{"--public-ip", "198.18.0.99"}, "198.18.0.99"},
		{"bad tun name", good, []string{"--tun", "this-name-is-far-too-long"}, "--tun"},
		{"bad VNI", `{"Network":"100.96.0.0/12","Backend":{"Type":"vxlan","VNI":0}}`, nil, "Backend.VNI"},
		{"udp and VXLAN on one port", `{"Network":"100.96.0.0/12","Backend":{"Port":8472}}`, nil, "Backend.VXLANPort"},
		// A flannel-style device holds the VXLAN port: VXLAN in userspace
		// cannot bind it.
		{"vxlan forced, kernel VXLAN off, its port taken", netConfWith("vxlan"), []string{"--kernel-vxlan=false", "--iface", n.Link}, "Backend.Type: vxlan"},
		{"wireguard mode", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","Mode":"fast"}}`, nil, "Backend.Mode"},
		{"wireguard keepalive", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","PersistentKeepalive":"often"}}`, nil, "Backend.PersistentKeepalive"},
		{"wireguard kernel without the module", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","Mode":"kernel"}}`, []string{"--wireguard-key", filepath.Join(dir, "absent.key"), "--iface", n.Link}, "Backend.Mode: kernel"},
		{"malformed key file", wgConf, []string{"--wireguard-key", badKey}, "--wireguard-key"},
		{"key file readable by others", wgConf, []string{"--wireguard-key", openKey}, "0644"},
		{"missing PSK file", wgConf, []string{"--wireguard-psk", filepath.Join(dir, "absent.psk")}, "--wireguard-psk"},
		{"short PSK", wgConf, []string{"--wireguard-psk", badKey}, "--wireguard-psk"},
		{"rekey out of range", wgConf, []string{"--wireguard-rekey-after", "10m"}, "--wireguard-rekey-after"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if strings.Contains(tt.name, "port taken") {
				if out, err := n.Run("sh", "-c", "ip link add flannel.1 type vxlan id 1 dstport 8472 nolearning && ip link set flannel.1 up"); err != nil {
					t.Fatalf("flannel-style device: %v: %s", err, out)
				}
				defer n.Run("ip", "link", "del", "flannel.1")
			}
			conf := filepath.Join(dir, "net-conf.json")
			os.WriteFile(conf, []byte(tt.netConf), 0o644)
			leases, run := filepath.Join(dir, tt.name, "leases"), filepath.Join(dir, tt.name, "run")
			args := append([]string{"--net-conf", conf, "--node-name", "n1", "--lease-dir", leases, "--run-dir", run}, tt.args...)
			cmd := n.Command(context.Background(), bin, args...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err := cmd.Run()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 {
				t.Fatalf("exit = %v, want status 2; stderr: %s", err, stderr.String())
			}
			msg := strings.TrimSpace(stderr.String())
			if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, tt.want) {
				t.Errorf("stderr = %q, want one line naming %s", msg, tt.want)
			}
			for _, p := range []string{leases, run, filepath.Join(dir, "absent.key")} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s was created", p)
				}
			}
			if out, err := n.Run("ip", "link", "show", "tulle0"); err == nil {
				t.Errorf("tulle0 was created: %s", out)
			}
		})
	}
}
