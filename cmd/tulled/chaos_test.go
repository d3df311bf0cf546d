package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// TestChaos disturbs a running two-node cluster the ways operators,
// attackers and bad luck do, each while a checksummed TCP transfer from n1
// to n2 is in flight. Every transfer must complete intact, and the counters
// must show what happened.
func TestChaos(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	a, b := c.Nodes[0], c.Nodes[1]
	intruder, err := c.Topo.AddNode()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		disturb func(t *testing.T)
	}{
		{"TUN deleted on the receiver", func(t *testing.T) { deleteTUN(t, b) }},
		{"TUN deleted on the sender", func(t *testing.T) { deleteTUN(t, a) }},
		{"cluster route deleted", func(t *testing.T) {
			sh(t, a.Node, "ip", "route", "del", "100.96.0.0/12", "dev", "tulle0")
			waitFor(t, func() bool {
				out, _ := a.Run("ip", "route", "show", "dev", "tulle0")
				return strings.Contains(out, "100.96.0.0/12")
			}, "the cluster route to come back")
		}},
		{"underlay MTU 1500 → 1400 → 1500", func(t *testing.T) {
			dropsBefore := counter(t, a, "drop_send")
			start := time.Now()
			for _, n := range []*cluster.Node{a, b} {
				sh(t, n.Node, "ip", "link", "set", n.Link, "mtu", "1400")
			}
			for _, n := range []*cluster.Node{a, b} {
				waitMTU(t, n, 1400-20-8-16)
			}
			t.Logf("device, status and subnet.json at MTU 1356 %v after the underlay change", time.Since(start).Round(time.Millisecond))
			// Until tulled follows, sends larger than the new MTU fail
			// (EMSGSIZE): how many depends on how fast it follows, which on
			// a loaded machine is tens of milliseconds of a full-speed
			// transfer (counted and logged). Once it follows, none may.
			followed := counter(t, a, "drop_send")
			time.Sleep(300 * time.Millisecond) // traffic at the small MTU
			if d := counter(t, a, "drop_send") - followed; d > 0 {
				t.Errorf("%d datagrams failed to send at MTU 1400 after tulled followed it", d)
			}
			for _, n := range []*cluster.Node{a, b} {
				sh(t, n.Node, "ip", "link", "set", n.Link, "mtu", "1500")
			}
			for _, n := range []*cluster.Node{a, b} {
				waitMTU(t, n, 1500-20-8-16)
			}
			d := counter(t, a, "drop_send") - dropsBefore
			t.Logf("%d datagrams failed to send across the MTU changes, all before tulled followed", d)
		}},
		{"tulled SIGKILLed and restarted", func(t *testing.T) {
			if err := b.Stop(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			if err := b.Start(); err != nil {
				t.Fatal(err)
			}
			if err := b.WaitPeers(context.Background(), 1); err != nil {
				t.Fatal(err)
			}
		}},
		{"forged peer endpoint floods fresh frame ids and ports", func(t *testing.T) {
			pid := b.PID()
			rssBefore := cluster.ProcStatusKB(pid, "VmRSS:")
			unknownBefore := counter(t, b, "drop_unknown_source")
			abandonedBefore := counter(t, b, "drop_incomplete") + counter(t, b, "drop_train_evicted")
			// From the intruder's host, with a's address forged: 20,000
			// train starts from a's own port (fresh frame ids), 20,000 from
			// fresh ports.
			const n = 20000
			err := intruder.Do(func() error {
				return forge(a.IP4, b.IP4, n, func(i int) (uint16, []byte) {
					d := make([]byte, 1400)
					d[0], d[1] = 0x12, 2 // version 1 FRAME, 8-byte header
					binary.BigEndian.PutUint16(d[2:], uint16(i))
					d[4], d[5] = 0, 45
					if i%2 == 0 {
						return 8285, d
					}
					return uint16(10000 + i%50000), d
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			waitCounter(t, b, "drop_unknown_source", unknownBefore+n/2)
			waitFor(t, func() bool {
				return counter(t, b, "drop_incomplete")+counter(t, b, "drop_train_evicted") > abandonedBefore
			}, "abandoned forged trains to be counted")
			growth := (cluster.ProcStatusKB(pid, "VmRSS:") - rssBefore) / 1024
			t.Logf("tulled RSS grew %.1f MiB under the flood", growth)
			if growth > 24 {
				t.Errorf("tulled RSS grew %.1f MiB under a flood of forged trains, want a small bound", growth)
			}
		}},
		{"a peer's address on a wrong port injects nothing", func(t *testing.T) {
			before := counter(t, b, "drop_unknown_source")
			pkt := ipv4Packet(addr(t, a, false), addr(t, b, false), 17, 32)
			d := append([]byte{0x11, 2, 0, 0, 0, 1, 0, 0}, pkt...)
			err := a.Do(func() error {
				conn, err := net.DialUDP("udp4", &net.UDPAddr{IP: a.IP4.AsSlice()}, &net.UDPAddr{IP: b.IP4.AsSlice(), Port: 8285})
				if err != nil {
					return err
				}
				defer conn.Close()
				for range 50 {
					if _, err := conn.Write(d); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			waitCounter(t, b, "drop_unknown_source", before+50)
		}},
		{"a forged non-peer source is dropped", func(t *testing.T) {
			before := counter(t, b, "drop_unknown_source")
			err := intruder.Do(func() error {
				return forge(netip.MustParseAddr("198.18.0.77"), b.IP4, 100, func(int) (uint16, []byte) {
					return 8285, append([]byte{0x11, 2, 0, 0, 0, 1, 0, 0}, ipv4Packet(netip.MustParseAddr("100.96.9.9"), addr(t, b, false), 17, 32)...)
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			waitCounter(t, b, "drop_unknown_source", before+100)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			tr := cluster.StartTransfer(ctx, a, b, addr(t, b, false), 120<<20, 3*time.Second)
			if err := tr.WaitReceived(ctx, 8<<20); err != nil {
				t.Fatal(err)
			}
			tc.disturb(t)
			res, err := tr.Wait()
			if err != nil {
				t.Fatalf("transfer across %q: %v", tc.name, err)
			}
			if !res.Intact() {
				t.Fatalf("transfer across %q corrupted: sent %x, received %x", tc.name, res.Sent, res.Received)
			}
			waitReady(t, a)
			waitReady(t, b)
		})
	}
}

// deleteTUN deletes n's TUN device and waits until tulled recreated it and
// is ready again.
func deleteTUN(t *testing.T, n *cluster.Node) {
	t.Helper()
	before := counter(t, n, "tun_recreated")
	start := time.Now()
	sh(t, n.Node, "ip", "link", "del", "tulle0")
	waitCounter(t, n, "tun_recreated", before+1)
	waitReady(t, n)
	t.Logf("%s's TUN recreated and ready %v after deletion", n.Name, time.Since(start).Round(time.Millisecond))
}

// TestReadinessFollowsTheNode: readiness reports what is true now. The
// underlay losing its address (which tulled does not own, so cannot
// repair) makes the node not ready until the address is back.
func TestReadinessFollowsTheNode(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	a := c.Nodes[0]
	waitReady(t, a)
	sh(t, a.Node, "ip", "addr", "del", a.IP4.String()+"/24", "dev", a.Link)
	waitFor(t, func() bool {
		s, err := a.Status(context.Background())
		return err == nil && strings.Contains(s.NotReady, a.IP4.String())
	}, "not ready naming the lost underlay address")
	sh(t, a.Node, "ip", "addr", "add", a.IP4.String()+"/24", "dev", a.Link)
	waitReady(t, a)
	ping(t, a, addr(t, c.Nodes[1], false))
}

// TestDuplicateNodeName: a second tulled started with a name a live tulled
// holds refuses with one line naming both addresses and exits 2; the first
// keeps its lease and forwards on.
func TestDuplicateNodeName(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	a, b := c.Nodes[0], c.Nodes[1]
	// b's namespace, a's name: another host claiming to be n1.
	args := b.Args()
	for i := range args {
		if args[i] == "--node-name" {
			args[i+1] = a.Name
		}
	}
	args = append(args, "--run-dir", filepath.Join(t.TempDir(), "run"), "--tun", "tulle9")
	cmd := b.Command(context.Background(), tulled(t), args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 {
		t.Fatalf("second tulled named %s: %v, want exit 2; stderr:\n%s", a.Name, err, stderr.String())
	}
	msg := strings.TrimSpace(stderr.String())
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, a.IP4.String()) || !strings.Contains(msg, b.IP4.String()) {
		t.Errorf("refusal = %q, want one line naming %s and %s", msg, a.IP4, b.IP4)
	}
	s, err := a.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.Lease.PublicIP != a.IP4 {
		t.Errorf("n1's published address is now %s", s.Lease.PublicIP)
	}
	ping(t, b, addr(t, a, false))
}

func sh(t *testing.T, n *topo.Node, name string, args ...string) {
	t.Helper()
	if out, err := n.Run(name, args...); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitReady(t *testing.T, n *cluster.Node) {
	t.Helper()
	var last string
	waitFor(t, func() bool {
		s, err := n.Status(context.Background())
		if err != nil {
			last = err.Error()
			return false
		}
		last = s.NotReady
		return s.NotReady == ""
	}, n.Name+" to be ready (last: "+last+")")
}

// waitMTU waits until the node's device, status and subnet.json all carry
// mtu.
func waitMTU(t *testing.T, n *cluster.Node, mtu int) {
	t.Helper()
	waitFor(t, func() bool {
		s, err := n.Status(context.Background())
		if err != nil || s.MTU != mtu {
			return false
		}
		sf, err := api.ReadSubnetFile(n.RunDir)
		if err != nil || sf.MTU != mtu {
			return false
		}
		out, _ := n.Run("ip", "link", "show", "tulle0")
		return strings.Contains(out, fmt.Sprintf("mtu %d ", mtu))
	}, fmt.Sprintf("%s to follow the underlay to MTU %d", n.Name, mtu))
}

// forge sends count UDP datagrams to dst:8285 with a forged IPv4 source
// address (raw socket, IP_HDRINCL); gen gives each one's source port and
// payload. It must run inside a namespace (Node.Do).
func forge(src, dst netip.Addr, count int, gen func(i int) (srcPort uint16, payload []byte)) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	to := &unix.SockaddrInet4{Addr: dst.As4()}
	for i := range count {
		port, payload := gen(i)
		p := make([]byte, 28+len(payload))
		p[0], p[8], p[9] = 0x45, 64, unix.IPPROTO_UDP
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		s, d := src.As4(), dst.As4()
		copy(p[12:], s[:])
		copy(p[16:], d[:])
		binary.BigEndian.PutUint16(p[20:], port)
		binary.BigEndian.PutUint16(p[22:], 8285)
		binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload))) // UDP checksum 0: none
		copy(p[28:], payload)
		for {
			err := unix.Sendto(fd, p, 0, to)
			if err == nil {
				break
			}
			if err != unix.ENOBUFS && err != unix.EAGAIN {
				return fmt.Errorf("forged datagram %d: %w", i, err)
			}
			time.Sleep(time.Millisecond)
		}
	}
	return nil
}
