package tunnel

import (
	"net/netip"
	"testing"
)

func TestPeerTableLookup(t *testing.T) {
	local := []netip.Prefix{netip.MustParsePrefix("100.96.1.0/24"), netip.MustParsePrefix("fd00:96:0:1::/64")}
	peers := []Peer{
		{Name: "b", Addr: netip.MustParseAddrPort("198.18.0.2:8285"), Subnets: []netip.Prefix{netip.MustParsePrefix("100.96.2.0/24"), netip.MustParsePrefix("fd00:96:0:2::/64")}},
		{Name: "wide", Addr: netip.MustParseAddrPort("198.18.0.3:8285"), Subnets: []netip.Prefix{netip.MustParsePrefix("100.97.0.0/16")}},
		{Name: "narrow", Addr: netip.MustParseAddrPort("198.18.0.4:8285"), Subnets: []netip.Prefix{netip.MustParsePrefix("100.97.5.0/24")}},
		{Name: "greedy", Addr: netip.MustParseAddrPort("[fd00:198::5]:8285"), Subnets: []netip.Prefix{netip.MustParsePrefix("100.96.0.0/12")}},
	}
	tbl := NewPeerTable(local)
	tbl.Set(local, peers)
	tests := []struct {
		dst  string
		want string
	}{
		{"100.96.2.77", "b"},
		{"fd00:96:0:2::1234", "b"},
		{"100.97.5.1", "narrow"}, // longest prefix wins
		{"100.97.6.1", "wide"},
		{"100.96.1.5", ""}, // own subnet: a peer's overlapping claim is ignored
		{"100.112.0.1", ""},
		{"fd00:96:0:3::1", ""},
		{"::ffff:100.96.2.77", ""}, // v4-mapped is not IPv4
	}
	for _, tt := range tests {
		p := tbl.Lookup(netip.MustParseAddr(tt.dst))
		got := ""
		if p != nil {
			got = p.Name
		}
		if got != tt.want {
			t.Errorf("Lookup(%s) = %q, want %q", tt.dst, got, tt.want)
		}
	}
	for _, tt := range []struct{ ep, want string }{
		{"[::ffff:198.18.0.2]:8285", "b"},
		{"198.18.0.2:8285", "b"},
		{"198.18.0.2:40000", ""}, // another process on b's host
		{"198.18.0.9:8285", ""},
		{"[fd00:198::5]:8285", "greedy"},
	} {
		got := ""
		if p := tbl.ByAddr(netip.MustParseAddrPort(tt.ep)); p != nil {
			got = p.Name
		}
		if got != tt.want {
			t.Errorf("ByAddr(%s) = %q, want %q", tt.ep, got, tt.want)
		}
	}
	if !tbl.IsLocal(netip.MustParseAddr("fd00:96:0:1::9")) || tbl.IsLocal(netip.MustParseAddr("100.96.2.1")) {
		t.Error("IsLocal wrong")
	}
	if b := tbl.ByAddr(netip.MustParseAddrPort("198.18.0.2:8285")); !b.Owns(netip.MustParseAddr("100.96.2.3")) || b.Owns(netip.MustParseAddr("100.96.3.3")) {
		t.Error("Owns wrong")
	}
	tbl.Set(local, nil)
	if p := tbl.Lookup(netip.MustParseAddr("100.96.2.77")); p != nil {
		t.Errorf("peer survived removal: %v", p)
	}
}

func TestPeerTableLookupDoesNotAllocate(t *testing.T) {
	tbl := NewPeerTable(nil)
	tbl.Set(nil, []Peer{{Name: "b", Subnets: []netip.Prefix{netip.MustParsePrefix("100.96.2.0/24"), netip.MustParsePrefix("fd00:96:0:2::/64")}}})
	d4, d6 := netip.MustParseAddr("100.96.2.1"), netip.MustParseAddr("fd00:96:0:2::1")
	if n := testing.AllocsPerRun(1000, func() { tbl.Lookup(d4); tbl.Lookup(d6) }); n != 0 {
		t.Errorf("Lookup allocates %v times per run", n)
	}
}

func BenchmarkPeerTableLookup(b *testing.B) {
	var peers []Peer
	for i := range 4096 {
		peers = append(peers, Peer{Name: "p", Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(96 + i>>8), byte(i), 0}), 24)}})
	}
	tbl := NewPeerTable(nil)
	tbl.Set(nil, peers)
	dst := netip.MustParseAddr("100.100.7.9")
	for b.Loop() {
		tbl.Lookup(dst)
	}
}

func TestValidateOffload(t *testing.T) {
	tcp4 := make([]byte, 20+20+100)
	tcp4[0], tcp4[9], tcp4[32] = 0x45, 6, 5<<4
	udp4 := make([]byte, 20+8+100)
	udp4[0], udp4[9] = 0x45, 17
	tcp6 := make([]byte, 40+20+100)
	tcp6[0], tcp6[6], tcp6[52] = 0x60, 6, 5<<4
	tests := []struct {
		name    string
		pkt     []byte
		o       Offload
		wantErr bool
		hdrLen  uint16
	}{
		{"none", tcp4, Offload{}, false, 0},
		{"partial", tcp4, Offload{Flags: FlagNeedsCsum, CsumStart: 20, CsumOffset: 16}, false, 0},
		{"tso4", tcp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv4, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, false, 40},
		{"tso4 ecn", tcp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv4 | GSOECN, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, false, 40},
		{"tso6", tcp6, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv6, GSOSize: 50, CsumStart: 40, CsumOffset: 16}, false, 60},
		{"uso", udp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOUDPL4, GSOSize: 50, CsumStart: 20, CsumOffset: 6}, false, 28},
		{"tso6 on v4", tcp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv6, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, true, 0},
		{"tso on udp", udp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv4, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, true, 0},
		{"gso without csum", tcp4, Offload{GSOType: GSOTCPv4, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, true, 0},
		{"gso size zero", tcp4, Offload{Flags: FlagNeedsCsum, GSOType: GSOTCPv4, CsumStart: 20, CsumOffset: 16}, true, 0},
		{"csum past end", tcp4, Offload{Flags: FlagNeedsCsum, CsumStart: 20, CsumOffset: 200}, true, 0},
		{"csum in ip header", tcp4, Offload{Flags: FlagNeedsCsum, CsumStart: 2, CsumOffset: 0}, true, 0},
		{"unknown flag", tcp4, Offload{Flags: 0x40}, true, 0},
		{"unknown gso", tcp4, Offload{Flags: FlagNeedsCsum, GSOType: 9, GSOSize: 50, CsumStart: 20, CsumOffset: 16}, true, 0},
		{"size without gso", tcp4, Offload{GSOSize: 9}, true, 0},
		{"short", tcp4[:10], Offload{Flags: FlagNeedsCsum}, true, 0},
	}
	for _, tt := range tests {
		hl, err := ValidateOffload(tt.pkt, tt.o)
		if (err != nil) != tt.wantErr || hl != tt.hdrLen {
			t.Errorf("%s: ValidateOffload = %d, %v; want %d, error %v", tt.name, hl, err, tt.hdrLen, tt.wantErr)
		}
	}
}
