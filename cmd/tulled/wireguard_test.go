package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/cluster"
)

// wgNetConf is the test network with WireGuard on its default port.
const wgNetConf = `{"Network":"100.96.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64,"Backend":{"Type":"wireguard","PersistentKeepalive":"0s"}}`

// capture runs tcpdump on n's interface dev into a file until stop.
func capture(t *testing.T, n *cluster.Node, dev string) (stop func() []byte) {
	t.Helper()
	f := t.TempDir() + "/" + dev + ".pcap"
	cmd := n.Command(context.Background(), "tcpdump", "-Z", "root", "--immediate-mode", "-i", dev, "-U", "-s", "0", "-w", f)
	var stderr bytes.Buffer
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
			for _, k := range []string{"wg_drop_auth", "wg_drop_replay", "wg_drop_malformed", "wg_drop_not_ip", "wg_drop_unknown_key", "drop_spoofed"} {
				if v := counter(t, b, k); v != 0 {
					t.Errorf("%s: %s = %d", b.Name, k, v)
				}
			}
			if v := counter(t, b, "datagrams_out"); v != 0 {
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
