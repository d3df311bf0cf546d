package vxlan

import (
	"net"
	"net/netip"
	"testing"
)

func TestGateway(t *testing.T) {
	mac, _ := net.ParseMAC("3e:f3:92:f7:0a:b1")
	tests := []struct{ subnet, want string }{
		{"100.96.5.0/24", "100.96.5.0"},
		{"fd00:96:0:5::/64", "fe80::3cf3:92ff:fef7:ab1"}, // EUI-64: U/L bit flipped, ff:fe inserted
	}
	for _, tt := range tests {
		if got := Gateway(netip.MustParsePrefix(tt.subnet), mac); got.String() != tt.want {
			t.Errorf("Gateway(%s) = %s, want %s", tt.subnet, got, tt.want)
		}
	}
}

func TestMACFor(t *testing.T) {
	a, b := MACFor("n1"), MACFor("n2")
	if a.String() != MACFor("n1").String() {
		t.Error("MACFor is not stable")
	}
	if a.String() == b.String() {
		t.Error("two nodes share a VTEP MAC")
	}
	if a[0]&0x01 != 0 || a[0]&0x02 == 0 {
		t.Errorf("%s is not a locally administered unicast MAC", a)
	}
	if Overhead(false) != 50 || Overhead(true) != 70 {
		t.Errorf("overheads %d/%d, want 50/70", Overhead(false), Overhead(true))
	}
}
