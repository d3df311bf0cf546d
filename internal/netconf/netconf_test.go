package netconf

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseValid(t *testing.T) {
	c, err := Parse([]byte(`{"Network":"100.96.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:96::/56","Backend":{"Type":"udp","Port":9000}}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.SubnetMin, netip.MustParseAddr("100.96.1.0"); got != want {
		t.Errorf("SubnetMin = %s, want %s", got, want)
	}
	if got, want := c.SubnetMax, netip.MustParseAddr("100.111.255.0"); got != want {
		t.Errorf("SubnetMax = %s, want %s", got, want)
	}
	if got, want := c.IPv6SubnetMax, netip.MustParseAddr("fd00:96:0:ff::"); got != want {
		t.Errorf("IPv6SubnetMax = %s, want %s", got, want)
	}
	if c.Backend.Port != 9000 || c.Backend.Type != "udp" {
		t.Errorf("Backend = %+v", c.Backend)
	}
	d, err := Parse([]byte(`{"Network":"100.96.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	if d.SubnetLen != 24 || d.Backend.Port != DefaultPort || d.Backend.Type != BackendAuto {
		t.Errorf("defaults not applied: %+v", d)
	}
	w, err := Parse([]byte(`{"Network":"100.96.0.0/16","Backend":{"Type":"wireguard","PersistentKeepalive":"25s"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if w.Backend.Port != DefaultWireGuardPort || w.Backend.Mode != WireGuardAuto || w.Backend.PersistentKeepalive != 25*time.Second {
		t.Errorf("wireguard defaults not applied: %+v", w.Backend)
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	tests := []struct {
		name, doc, field string
	}{
		{"missing network", `{}`, "Network"},
		{"not a prefix", `{"Network":"100.96.0.0"}`, "Network"},
		{"host bits", `{"Network":"100.96.0.1/12"}`, "Network"},
		{"v6 in v4 field", `{"Network":"fd00::/56"}`, "Network"},
		{"subnet too short", `{"Network":"100.96.0.0/12","SubnetLen":8}`, "SubnetLen"},
		{"subnet too long", `{"Network":"100.96.0.0/12","SubnetLen":33}`, "SubnetLen"},
		{"wrong type", `{"Network":"100.96.0.0/12","SubnetLen":"24"}`, "SubnetLen"},
		{"typo", `{"Network":"100.96.0.0/12","SubnetLength":24}`, "SubnetLength"},
		{"min outside", `{"Network":"100.96.0.0/12","SubnetMin":"100.200.0.0"}`, "SubnetMin"},
		{"min unaligned", `{"Network":"100.96.0.0/12","SubnetMin":"100.96.1.5"}`, "SubnetMin"},
		{"max below min", `{"Network":"100.96.0.0/12","SubnetMin":"100.96.9.0","SubnetMax":"100.96.3.0"}`, "SubnetMax"},
		{"v6 missing", `{"Network":"100.96.0.0/12","EnableIPv6":true}`, "IPv6Network"},
		{"v6 family", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"100.96.0.0/12"}`, "IPv6Network"},
		{"nothing enabled", `{"EnableIPv4":false}`, "EnableIPv4"},
		{"backend", `{"Network":"100.96.0.0/12","Backend":{"Type":"ipip"}}`, "Backend.Type"},
		{"port", `{"Network":"100.96.0.0/12","Backend":{"Type":"udp","Port":70000}}`, "Backend.Port"},
		{"vni", `{"Network":"100.96.0.0/12","Backend":{"Type":"vxlan","VNI":16777216}}`, "Backend.VNI"},
		{"vxlan port", `{"Network":"100.96.0.0/12","Backend":{"Type":"vxlan","VXLANPort":0}}`, "Backend.VXLANPort"},
		{"vxlan port is udp's", `{"Network":"100.96.0.0/12","Backend":{"Port":8472}}`, "Backend.VXLANPort"},
		{"wireguard mode", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","Mode":"fast"}}`, "Backend.Mode"},
		{"keepalive", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","PersistentKeepalive":"soon"}}`, "Backend.PersistentKeepalive"},
		{"keepalive fraction", `{"Network":"100.96.0.0/12","Backend":{"Type":"wireguard","PersistentKeepalive":"2.5s"}}`, "Backend.PersistentKeepalive"},
		{"mode without wireguard", `{"Network":"100.96.0.0/12","Backend":{"Type":"udp","Mode":"kernel"}}`, "Backend.Mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("Parse(%s) = %v, want a FieldError for %s", tt.doc, err, tt.field)
			}
			if fe.Field != tt.field {
				t.Errorf("error names field %q, want %q (%v)", fe.Field, tt.field, err)
			}
			if !strings.Contains(err.Error(), tt.field) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is not one line naming %s", err, tt.field)
			}
		})
	}
	if _, err := Parse([]byte(`{"Network":`)); err == nil {
		t.Error("truncated JSON parsed")
	}
}

func TestSubnetArithmetic(t *testing.T) {
	tests := []struct {
		min, max string
		bits     int
		count    int
		at       int
		want     string
	}{
		{"100.96.1.0", "100.111.255.0", 24, 4095, 4094, "100.111.255.0/24"},
		{"100.96.1.0", "100.96.1.0", 24, 1, 0, "100.96.1.0/24"},
		{"100.64.0.0", "100.64.0.240", 28, 16, 3, "100.64.0.48/28"},
		{"fd00:96::", "fd00:96:0:ff::", 64, 256, 255, "fd00:96:0:ff::/64"},
		{"fd00::", "fd00::ff:ff00", 120, 1 << 16, 0x1234, "fd00::12:3400/120"},
	}
	for _, tt := range tests {
		min, max := netip.MustParseAddr(tt.min), netip.MustParseAddr(tt.max)
		if got := SubnetCount(min, max, tt.bits); got != tt.count {
			t.Errorf("SubnetCount(%s, %s, %d) = %d, want %d", min, max, tt.bits, got, tt.count)
		}
		if got := SubnetAt(min, tt.bits, tt.at); got.String() != tt.want {
			t.Errorf("SubnetAt(%s, %d, %d) = %s, want %s", min, tt.bits, tt.at, got, tt.want)
		}
	}
}
