package cni

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/tulle-net/tulle/internal/api"
)

func testPool(t *testing.T, subnet string) *addrPool {
	t.Helper()
	c := &NetConf{DataDir: t.TempDir()}
	c.Name = "tulle-test"
	m, err := openIPAM(c, &api.SubnetFile{Subnet: netip.MustParsePrefix(subnet), IPv6Subnet: netip.MustParsePrefix("fd00:96:0:5::/64")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.close)
	return m
}

func files(t *testing.T, m *addrPool) int {
	t.Helper()
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			n++
		}
	}
	return n
}

// TestAllocateNeverFreesOthers: a second allocation for a live attachment
// fails and leaves the first in place; a failing allocation (IPv4 exhausted
// after IPv6 succeeded, or the reverse) frees only its own addresses.
func TestAllocateNeverFreesOthers(t *testing.T) {
	m := testPool(t, "100.96.5.0/30") // one pod address: .2
	first, err := m.allocate("c1", "eth0")
	if err != nil || len(first) != 2 {
		t.Fatalf("allocate: %v, %v", first, err)
	}
	if _, err := m.allocate("c1", "eth0"); err == nil {
		t.Fatal("a second allocation for the same attachment succeeded")
	}
	if !m.has("c1", "eth0") || files(t, m) != 2 {
		t.Fatalf("the live attachment lost its addresses (%d files)", files(t, m))
	}
	// c2: the IPv4 range is exhausted, so its IPv6 address (allocated
	// second) is never taken, and nothing of c1's goes.
	if _, err := m.allocate("c2", "eth0"); !errors.Is(err, errExhausted) {
		t.Fatalf("allocate c2 = %v, want exhausted", err)
	}
	if files(t, m) != 2 || m.has("c2", "eth0") {
		t.Fatalf("after the failed allocation: %d files, c2 held = %v", files(t, m), m.has("c2", "eth0"))
	}
	held := m.held("c1", "eth0")
	if len(held) != 2 || held[0].Address.String() != first[0].Address.String() || held[1].Address.String() != first[1].Address.String() {
		t.Fatalf("held = %v, want %v", held, first)
	}
	// releaseIPs frees exactly what it is given, only while it is the
	// attachment's.
	if err := m.releaseIPs("c2", "eth0", first); err != nil {
		t.Fatal(err)
	}
	if files(t, m) != 2 {
		t.Fatal("releaseIPs freed another attachment's addresses")
	}
	if err := m.releaseIPs("c1", "eth0", first[:1]); err != nil {
		t.Fatal(err)
	}
	if files(t, m) != 1 {
		t.Fatalf("releaseIPs of one address left %d files", files(t, m))
	}
	if _, err := os.Stat(filepath.Join(m.dir, first[1].Address.IP.String())); err != nil {
		t.Fatalf("the other address went too: %v", err)
	}
}
