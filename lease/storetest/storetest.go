// Package storetest is the conformance suite of lease.Store: the contract
// every store that allocates subnets itself (lease/local, lease/kube in
// lease mode) must keep, written once and run by each store's tests against
// its real backing state (a directory, a real API server).
package storetest

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
)

// Harness gives the suite fresh stores on one backing state.
type Harness struct {
	// Open returns a store as another tulled would open it: on the same
	// backing state as every other store of this harness, for network c,
	// with lease lifetime TTL and the harness's clock.
	Open func(t *testing.T, c *netconf.Config) Store
	// Advance moves the clock every store of the harness reads.
	Advance func(d time.Duration)
	// TTL is the lease lifetime the stores grant.
	TTL time.Duration
}

// Store is what the suite needs of a store.
type Store interface {
	lease.Store
	lease.Lookuper
}

// Networks the cases use.
const (
	DualStack = `{"Network":"100.96.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","IPv6SubnetLen":64}`
	// OneSubnet leaves a second node nothing but a takeover.
	OneSubnet = `{"Network":"100.96.0.0/24","SubnetLen":24,"SubnetMin":"100.96.0.0"}`
)

// Attrs returns attributes publishing ip.
func Attrs(ip string) lease.Attrs {
	return lease.Attrs{PublicIP: netip.MustParseAddr(ip), Backend: lease.Backend{Type: "udp", Port: 8285}}
}

// Run runs every case; newHarness is called once per case, so each starts
// from an empty store.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	cases := []struct {
		name string
		fn   func(t *testing.T, h Harness)
	}{
		{"a restarted node keeps its subnets and republishes", restartKeepsSubnets},
		{"a held subnet is renewed, expires, and is taken over", expiryAndTakeover},
		{"a node name held by a live tulled elsewhere is refused", nameInUse},
		{"peers are watched as they come and go", watchPeers},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.fn(t, newHarness(t)) })
	}
}

func conf(t *testing.T, doc string) *netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func restartKeepsSubnets(t *testing.T, h Harness) {
	ctx := context.Background()
	c := conf(t, DualStack)
	l1, err := h.Open(t, c).Claim(ctx, "n1", Attrs("198.18.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	if !l1.Subnet.IsValid() || !l1.IPv6Subnet.IsValid() {
		t.Fatalf("dual-stack lease missing a family: %+v", l1)
	}
	for _, p := range l1.Subnets() {
		if err := c.CheckSubnet(p); err != nil {
			t.Errorf("claimed subnet: %v", err)
		}
	}
	h.Advance(h.TTL + time.Second) // expired, but nobody took it
	again := Attrs("198.18.0.1")
	again.Backend.Port = 8299
	l2, err := h.Open(t, c).Claim(ctx, "n1", again)
	if err != nil {
		t.Fatal(err)
	}
	if l2.Subnet != l1.Subnet || l2.IPv6Subnet != l1.IPv6Subnet {
		t.Errorf("restart got %s/%s, want the old %s/%s", l2.Subnet, l2.IPv6Subnet, l1.Subnet, l1.IPv6Subnet)
	}
	if l2.Attrs.Backend.Port != 8299 {
		t.Errorf("attributes not republished: %+v", l2.Attrs)
	}
	if got, ok, err := h.Open(t, c).Lookup(ctx, "n1"); err != nil || !ok || got.Attrs.Backend.Port != 8299 {
		t.Errorf("Lookup after the restart: %+v, %v, %v", got, ok, err)
	}
}

func expiryAndTakeover(t *testing.T, h Harness) {
	ctx := context.Background()
	c := conf(t, OneSubnet)
	sa, sb := h.Open(t, c), h.Open(t, c)
	a, err := sa.Claim(ctx, "a", Attrs("198.18.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sb.Claim(ctx, "b", Attrs("198.18.0.2")); !errors.Is(err, lease.ErrExhausted) {
		t.Fatalf("claim of a held subnet: %v, want ErrExhausted", err)
	}
	step := h.TTL * 5 / 6
	h.Advance(step)
	if a, err = sa.Renew(ctx, a); err != nil {
		t.Fatal(err)
	}
	h.Advance(step) // past a TTL since the claim, not since the renewal
	if _, err := sb.Claim(ctx, "b", Attrs("198.18.0.2")); !errors.Is(err, lease.ErrExhausted) {
		t.Fatalf("claim of a renewed lease: %v, want ErrExhausted", err)
	}
	h.Advance(h.TTL + time.Second) // a stopped renewing
	b, err := sb.Claim(ctx, "b", Attrs("198.18.0.2"))
	if err != nil {
		t.Fatalf("takeover of an expired lease: %v", err)
	}
	if b.Subnet != a.Subnet {
		t.Fatalf("takeover got %s, want %s", b.Subnet, a.Subnet)
	}
	if _, err := sa.Renew(ctx, a); !errors.Is(err, lease.ErrLost) {
		t.Errorf("renewal after takeover: %v, want ErrLost", err)
	}
	if err := sa.Release(ctx, a); err != nil {
		t.Errorf("release of a lost lease: %v", err)
	}
	if got, ok, _ := sb.Lookup(ctx, "b"); !ok || got.Node != "b" {
		t.Errorf("releasing the old holder's lease removed the new holder's: %+v %v", got, ok)
	}
	if _, err := sb.Renew(ctx, b); err != nil {
		t.Errorf("the new holder's lease was hurt: %v", err)
	}
	if err := sb.Release(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := sb.Release(ctx, b); err != nil {
		t.Errorf("second release: %v, want nil", err)
	}
	if _, ok, _ := sb.Lookup(ctx, "b"); ok {
		t.Error("a released lease is still there")
	}
}

func nameInUse(t *testing.T, h Harness) {
	ctx := context.Background()
	c := conf(t, DualStack)
	s := h.Open(t, c)
	first, err := s.Claim(ctx, "n1", Attrs("198.18.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	h.Advance(lease.RenewInterval(h.TTL) / 2)
	_, err = h.Open(t, c).Claim(ctx, "n1", Attrs("198.18.0.2"))
	if !errors.Is(err, lease.ErrInUse) {
		t.Fatalf("claim of n1 from another address = %v, want ErrInUse", err)
	}
	for _, want := range []string{"198.18.0.1", "198.18.0.2", `"n1"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not name %s", err, want)
		}
	}
	if _, err := s.Renew(ctx, first); err != nil {
		t.Fatalf("the holder lost its lease to the refused claim: %v", err)
	}
	// A holder silent for a renewal interval and more is gone: its node
	// may come back from another address and keep its subnet.
	h.Advance(lease.RenewInterval(h.TTL) + time.Minute)
	moved, err := h.Open(t, c).Claim(ctx, "n1", Attrs("198.18.0.3"))
	if err != nil || moved.Subnet != first.Subnet {
		t.Fatalf("claim after the holder went silent: %v, %v", moved.Subnet, err)
	}
}

func watchPeers(t *testing.T, h Harness) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := conf(t, DualStack)
	s := h.Open(t, c)
	if _, err := s.Claim(ctx, "a", Attrs("198.18.0.1")); err != nil {
		t.Fatal(err)
	}
	ch, err := s.WatchPeers(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	next := func(what string, want func([]lease.Peer) bool) []lease.Peer {
		t.Helper()
		timeout := time.After(30 * time.Second)
		var last []lease.Peer
		for {
			select {
			case p := <-ch:
				if last = p; want(p) {
					return p
				}
			case <-timeout:
				t.Fatalf("no snapshot with %s; last: %+v", what, last)
			}
		}
	}
	count := func(n int) func([]lease.Peer) bool { return func(p []lease.Peer) bool { return len(p) == n } }
	next("no peers (self is not one)", count(0))
	b, err := h.Open(t, c).Claim(ctx, "b", Attrs("198.18.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	p := next("b", count(1))
	if p[0].Node != "b" || p[0].Subnet != b.Subnet || p[0].IPv6Subnet != b.IPv6Subnet || p[0].Attrs.PublicIP != b.Attrs.PublicIP {
		t.Errorf("peer = %+v, want b with %s", p[0], b.Subnet)
	}
	sc := h.Open(t, c)
	cl, err := sc.Claim(ctx, "c", Attrs("198.18.0.3"))
	if err != nil {
		t.Fatal(err)
	}
	next("b and c", count(2))
	if err := sc.Release(ctx, cl); err != nil {
		t.Fatal(err)
	}
	next("b after c left", count(1))
}
