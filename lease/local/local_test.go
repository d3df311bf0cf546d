package local

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/storetest"
)

// clock is a settable time source shared by the stores of one test.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func newClock() *clock               { return &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }
func quiet() *slog.Logger            { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
func attrs(ip string) lease.Attrs {
	return lease.Attrs{PublicIP: netip.MustParseAddr(ip), Backend: lease.Backend{Type: "udp", Port: 8285}}
}
func mustConf(t *testing.T, doc string) *netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newStore(t *testing.T, dir string, c *netconf.Config, clk *clock) *Store {
	t.Helper()
	s, err := New(Options{Dir: dir, Net: c, TTL: time.Minute, PollInterval: 20 * time.Millisecond, Logger: quiet(), Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestConformance runs the lease.Store contract on a directory.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		dir, clk := t.TempDir(), newClock()
		return storetest.Harness{
			Open:    func(t *testing.T, c *netconf.Config) storetest.Store { return newStore(t, dir, c, clk) },
			Advance: clk.Add,
			TTL:     time.Minute,
		}
	})
}

func TestConcurrentClaimsOneWinnerPerSubnet(t *testing.T) {
	// 16 subnets, 40 nodes in separate stores on one directory: exactly 16
	// claims succeed, all with different subnets; the rest are exhausted.
	dir := t.TempDir()
	c := mustConf(t, `{"Network":"100.96.0.0/20","SubnetLen":24,"SubnetMin":"100.96.0.0"}`)
	clk := newClock()
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	exhausted := 0
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := newStore(t, dir, c, clk)
			node := "node-" + string(rune('A'+i))
			l, err := s.Claim(context.Background(), node, attrs("198.18.0.1"))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, lease.ErrExhausted):
				exhausted++
			case err != nil:
				t.Errorf("claim %s: %v", node, err)
			default:
				if prev, dup := got[l.Subnet]; dup {
					t.Errorf("subnet %s given to both %s and %s", l.Subnet, prev, node)
				}
				got[l.Subnet] = node
			}
		}()
	}
	wg.Wait()
	if len(got) != 16 || exhausted != 24 {
		t.Errorf("got %d winners and %d exhausted, want 16 and 24", len(got), exhausted)
	}
}

func TestWatchPeers(t *testing.T) {
	dir := t.TempDir()
	c := mustConf(t, `{"Network":"100.96.0.0/12"}`)
	clk := newClock()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newStore(t, dir, c, clk)
	a, err := s.Claim(ctx, "a", attrs("198.18.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := s.WatchPeers(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	next := func(want int) []lease.Peer {
		t.Helper()
		timeout := time.After(5 * time.Second)
		for {
			select {
			case p := <-ch:
				if len(p) == want {
					return p
				}
			case <-timeout:
				t.Fatalf("no snapshot with %d peers", want)
			}
		}
	}
	next(0) // self is not a peer
	b, err := s.Claim(ctx, "b", attrs("198.18.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	if p := next(1); p[0].Node != "b" || p[0].Subnet != b.Subnet {
		t.Errorf("peer = %+v, want b with %s", p[0], b.Subnet)
	}
	// A malformed file is ignored, not fatal.
	if err := os.WriteFile(filepath.Join(dir, "100.96.99.0-24.json"), []byte("{nope"), 0o644); err != nil {
		t.Fatal(err)
	}
	cl, err := s.Claim(ctx, "c", attrs("198.18.0.3"))
	if err != nil {
		t.Fatal(err)
	}
	next(2)
	if err := s.Release(ctx, cl); err != nil {
		t.Fatal(err)
	}
	next(1)
	// b expires without renewal; a keeps renewing.
	clk.Add(61 * time.Second)
	if _, err := s.Renew(ctx, a); err != nil {
		t.Fatal(err)
	}
	next(0)
}

// TestBadLeaseFilesIgnored: files that do not describe a subnet of this
// network are neither peers nor obstacles, and each is reported once.
func TestBadLeaseFilesIgnored(t *testing.T) {
	dir := t.TempDir()
	c := mustConf(t, `{"Network":"100.96.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64}`)
	clk := newClock()
	exp := clk.Now().Add(time.Hour).Format(time.RFC3339)
	bad := map[string]string{
		"0.0.0.0-0.json":        `{"node":"evil","subnet":"0.0.0.0/0","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"100.96.0.0-16.json":    `{"node":"wide","subnet":"100.96.0.0/16","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"100.97.1.0-24.json":    `{"node":"other-net","subnet":"100.97.1.0/24","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"100.96.1.7-24.json":    `{"node":"unmasked","subnet":"100.96.1.7/24","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"fd00_96_0_1__-64.json": `{"node":"v6-as-v4","subnet":"fd00:96:0:1::/64","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"100.96.2.0-24.json":    `{"node":"v4-as-v6","subnet":"100.96.2.0/24","ipv6Subnet":"100.96.3.0/24","attrs":{"publicIP":"198.18.0.9","backend":{"type":"udp","port":8285}},"expiration":"` + exp + `"}`,
		"100.96.4.0-24.json":    `{"node":"", "subnet":"100.96.4.0/24"}`,
		"100.96.5.0-24.json":    `not json`,
	}
	for name, doc := range bad {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var logs strings.Builder
	s, err := New(Options{Dir: dir, Net: c, TTL: time.Minute, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	good, err := newStore(t, dir, c, clk).Claim(context.Background(), "good", attrs("198.18.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		peers, err := s.peers("me")
		if err != nil {
			t.Fatal(err)
		}
		if len(peers) != 1 || peers[0].Node != "good" {
			t.Fatalf("peers = %+v, want only the good lease", peers)
		}
	}
	if !good.Subnet.IsValid() {
		t.Fatal("no subnet for the good node")
	}
	for name := range bad {
		if n := strings.Count(logs.String(), "file="+name); n != 1 {
			t.Errorf("%s reported %d times, want once", name, n)
		}
	}
}
