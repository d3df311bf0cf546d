package policy

import (
	"net/netip"
	"slices"
	"testing"
)

func TestSpans(t *testing.T) {
	p := func(s string) span { return prefixSpan(netip.MustParsePrefix(s)) }
	str := func(s []span) []string {
		var out []string
		for _, x := range s {
			out = append(out, x.String())
		}
		return out
	}
	for _, tc := range []struct {
		name string
		got  []span
		want []string
	}{
		{"host bits masked", []span{p("100.64.0.1/0")}, []string{"0.0.0.0/0"}},
		{"except in the middle", subtract([]span{p("100.64.0.0/16")}, []span{p("100.64.2.0/24")}), []string{"100.64.0.0/23", "100.64.3.0-100.64.255.255"}},
		{"except covering all", subtract([]span{p("100.64.1.0/24")}, []span{p("100.64.0.0/16")}), nil},
		{"except of the other family", subtract([]span{p("100.64.0.0/16")}, []span{p("fd00::/8")}), []string{"100.64.0.0/16"}},
		{"except at the top of the space", subtract([]span{p("0.0.0.0/0")}, []span{p("255.255.255.255/32")}), []string{"0.0.0.0-255.255.255.254"}},
		{"merge adjacent and overlapping", merge([]span{p("100.64.1.0/24"), p("100.64.0.0/24"), p("100.64.0.128/25"), p("100.64.5.0/24")}), []string{"100.64.0.0/23", "100.64.5.0/24"}},
		{"merge at the top of the space", merge([]span{p("255.255.255.0/24"), p("255.255.255.255/32")}), []string{"255.255.255.0/24"}},
		{"IPv6", subtract([]span{p("fd00:64::/32")}, []span{p("fd00:64:1::/48")}), []string{"fd00:64::/48", "fd00:64:2::-fd00:64:ffff:ffff:ffff:ffff:ffff:ffff"}},
	} {
		if got := str(tc.got); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestMergePorts(t *testing.T) {
	got := mergePorts([]string{"tcp . 80", "tcp . 81", "tcp . 70-79", "udp . 53", "tcp . 0-65535", "sctp . 9"})
	want := []string{"sctp . 9", "tcp . 0-65535", "udp . 53"}
	if !slices.Equal(got, want) {
		t.Errorf("%v, want %v", got, want)
	}
}
