// Package netconf parses and validates net-conf.json, the cluster network
// configuration shared by tulled, its lease stores and the CNI plugin.
//
// The shape is flannel's (Network, SubnetLen, SubnetMin, SubnetMax,
// EnableIPv4, EnableIPv6, IPv6Network, IPv6SubnetLen, Backend), so an existing
// flannel ConfigMap works unchanged where tulle supports its backend. The
// package only reads; it never touches the system.
package netconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"
)

// Defaults: the udp backend's port (flannel's udp port), and flannel's
// VXLAN network identifier and port.
const (
	DefaultPort      = 8285
	DefaultVNI       = 1
	DefaultVXLANPort = 8472
)

// Backend types. BackendAuto (the default) picks, per peer, the fastest
// backend both nodes speak; any other forces that backend for every peer.
const (
	BackendAuto   = "auto"
	BackendUDP    = "udp"
	BackendHostGW = "host-gw"
	BackendVXLAN  = "vxlan"
	// BackendWireGuard encrypts: every peer is reached over WireGuard,
	// none over a plaintext backend.
	BackendWireGuard = "wireguard"
)

// WireGuard modes (Backend.Mode): the kernel's WireGuard where the module
// is there, else tulled's own (auto); one or the other only.
const (
	WireGuardAuto      = "auto"
	WireGuardUserspace = "userspace"
	WireGuardKernel    = "kernel"
)

// DefaultWireGuardPort is Backend.Port's default with Type wireguard.
const DefaultWireGuardPort = 51820

// Backends returns the backend types a node may publish as its one legacy
// backend (lease.Attrs.Backend): udp, or wireguard for a node that
// speaks nothing else.
func Backends() []string { return []string{BackendUDP, BackendWireGuard} }

// Types returns the values Backend.Type accepts.
func Types() []string {
	return []string{BackendAuto, BackendUDP, BackendHostGW, BackendVXLAN, BackendWireGuard}
}

// Config is a parsed, validated net-conf.json.
type Config struct {
	EnableIPv4    bool
	EnableIPv6    bool
	Network       netip.Prefix // IPv4 cluster network; valid iff EnableIPv4
	SubnetLen     int
	SubnetMin     netip.Addr
	SubnetMax     netip.Addr
	IPv6Network   netip.Prefix // valid iff EnableIPv6
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr
	Backend       Backend
}

// Backend selects and configures the encapsulation.
type Backend struct {
	Type string
	// Port is the udp backend's UDP port.
	Port uint16
	// VNI and VXLANPort configure VXLAN (flannel's defaults: 1, 8472).
	VNI       int
	VXLANPort uint16
	// Mode and PersistentKeepalive configure WireGuard (Port is its
	// UDP port then: default 51820).
	Mode                string
	PersistentKeepalive time.Duration
}

// CheckSubnet reports why p cannot be a node subnet of this network: its
// family must be enabled, and it must be a masked prefix of the configured
// subnet length inside the cluster network of its family. It is what keeps a
// malformed or hostile lease (0.0.0.0/0, another network) out of the peer
// table.
func (c *Config) CheckSubnet(p netip.Prefix) error {
	network, bits := c.Network, c.SubnetLen
	if p.Addr().Is6() {
		network, bits = c.IPv6Network, c.IPv6SubnetLen
	}
	switch {
	case !p.IsValid():
		return errors.New("invalid subnet")
	case p.Addr().Is4() && !c.EnableIPv4, p.Addr().Is6() && !c.EnableIPv6:
		return fmt.Errorf("%s is of a family the network does not enable", p)
	case p.Bits() != bits || p.Masked() != p || !network.Contains(p.Addr()):
		return fmt.Errorf("%s is not a /%d of %s", p, bits, network)
	}
	return nil
}

// CheckSubnets checks a lease's subnet pair: at least one, each of the
// family of its field (v4 IPv4, v6 IPv6), each a valid node subnet.
func (c *Config) CheckSubnets(v4, v6 netip.Prefix) error {
	if !v4.IsValid() && !v6.IsValid() {
		return errors.New("no subnet")
	}
	if v4.IsValid() && !v4.Addr().Is4() {
		return fmt.Errorf("IPv4 subnet %s is not IPv4", v4)
	}
	if v6.IsValid() && (!v6.Addr().Is6() || v6.Addr().Is4In6()) {
		return fmt.Errorf("IPv6 subnet %s is not IPv6", v6)
	}
	for _, p := range []netip.Prefix{v4, v6} {
		if p.IsValid() {
			if err := c.CheckSubnet(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// FieldError names the net-conf.json field that is wrong.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return fmt.Sprintf("net-conf field %s: %v", e.Field, e.Err) }
func (e *FieldError) Unwrap() error { return e.Err }

// raw mirrors the JSON document. Pointers tell "absent" from "zero".
type raw struct {
	Network       string
	SubnetLen     *int
	SubnetMin     string
	SubnetMax     string
	EnableIPv4    *bool
	EnableIPv6    *bool
	IPv6Network   string
	IPv6SubnetLen *int
	IPv6SubnetMin string
	IPv6SubnetMax string
	Backend       *struct {
		Type                string
		Port                *int
		VNI                 *int
		VXLANPort           *int
		Mode                string
		PersistentKeepalive string
	}
}

// Load reads and parses the file at path.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read net-conf: %w", err)
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Parse parses and validates a net-conf.json document. Unknown fields are
// rejected so that a typo ("SubnetLength") is an error, not a silent default.
func Parse(b []byte) (*Config, error) {
	var r raw
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return nil, &FieldError{Field: ute.Field, Err: fmt.Errorf("want a %s, got a JSON %s", ute.Type, ute.Value)}
		}
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return nil, &FieldError{Field: strings.Trim(f, `"`), Err: errors.New("unknown field")}
		}
		return nil, fmt.Errorf("net-conf is not valid JSON: %w", err)
	}
	if dec.More() {
		return nil, errors.New("net-conf has trailing data after the JSON object")
	}
	return r.validate()
}

func (r *raw) validate() (*Config, error) {
	c := &Config{EnableIPv4: true}
	if r.EnableIPv4 != nil {
		c.EnableIPv4 = *r.EnableIPv4
	}
	if r.EnableIPv6 != nil {
		c.EnableIPv6 = *r.EnableIPv6
	}
	if !c.EnableIPv4 && !c.EnableIPv6 {
		return nil, &FieldError{Field: "EnableIPv4", Err: errors.New("both EnableIPv4 and EnableIPv6 are false: nothing to do")}
	}
	if c.EnableIPv4 {
		var err error
		c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax, err = family(false, "", r.Network, r.SubnetLen, r.SubnetMin, r.SubnetMax, 24)
		if err != nil {
			return nil, err
		}
	}
	if c.EnableIPv6 {
		var err error
		c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax, err = family(true, "IPv6", r.IPv6Network, r.IPv6SubnetLen, r.IPv6SubnetMin, r.IPv6SubnetMax, 64)
		if err != nil {
			return nil, err
		}
	}
	c.Backend = Backend{Type: BackendAuto, Port: DefaultPort, VNI: DefaultVNI, VXLANPort: DefaultVXLANPort}
	if r.Backend != nil {
		if r.Backend.Type != "" {
			c.Backend.Type = r.Backend.Type
		}
		if c.Backend.Type == BackendWireGuard {
			c.Backend.Port, c.Backend.Mode = DefaultWireGuardPort, WireGuardAuto
			if r.Backend.Mode != "" {
				c.Backend.Mode = r.Backend.Mode
			}
			if !slices.Contains([]string{WireGuardAuto, WireGuardUserspace, WireGuardKernel}, c.Backend.Mode) {
				return nil, &FieldError{Field: "Backend.Mode", Err: fmt.Errorf("unknown WireGuard mode %q (supported: auto, userspace, kernel)", c.Backend.Mode)}
			}
			if ka := r.Backend.PersistentKeepalive; ka != "" {
				d, err := time.ParseDuration(ka)
				if err != nil || d < 0 || d > 65535*time.Second || d%time.Second != 0 {
					return nil, &FieldError{Field: "Backend.PersistentKeepalive", Err: fmt.Errorf("%q is not a whole number of seconds up to 65535s (e.g. \"25s\"; \"0s\" is off)", ka)}
				}
				c.Backend.PersistentKeepalive = d
			}
		} else if r.Backend.Mode != "" || r.Backend.PersistentKeepalive != "" {
			return nil, &FieldError{Field: "Backend.Mode", Err: fmt.Errorf("Mode and PersistentKeepalive are WireGuard's; Backend.Type is %q", c.Backend.Type)}
		}
		if r.Backend.Port != nil {
			p := *r.Backend.Port
			if p < 1 || p > 65535 {
				return nil, &FieldError{Field: "Backend.Port", Err: fmt.Errorf("%d is not a UDP port (1-65535)", p)}
			}
			c.Backend.Port = uint16(p)
		}
		if r.Backend.VNI != nil {
			if v := *r.Backend.VNI; v < 1 || v > 1<<24-1 {
				return nil, &FieldError{Field: "Backend.VNI", Err: fmt.Errorf("%d is not a VXLAN network identifier (1-16777215)", v)}
			}
			c.Backend.VNI = *r.Backend.VNI
		}
		if r.Backend.VXLANPort != nil {
			p := *r.Backend.VXLANPort
			if p < 1 || p > 65535 {
				return nil, &FieldError{Field: "Backend.VXLANPort", Err: fmt.Errorf("%d is not a UDP port (1-65535)", p)}
			}
			c.Backend.VXLANPort = uint16(p)
		}
	}
	if c.Backend.VXLANPort == c.Backend.Port {
		return nil, &FieldError{Field: "Backend.VXLANPort", Err: fmt.Errorf("%d is Backend.Port too: udp and VXLAN need a port each", c.Backend.Port)}
	}
	if !slices.Contains(Types(), c.Backend.Type) {
		return nil, &FieldError{Field: "Backend.Type", Err: fmt.Errorf("unknown backend %q (supported: %s)", c.Backend.Type, strings.Join(Types(), ", "))}
	}
	return c, nil
}

// family validates one address family's network, subnet length and range.
// prefix is "" for IPv4 and "IPv6" for IPv6, matching the JSON field names.
func family(v6 bool, prefix, network string, subnetLen *int, min, max string, defLen int) (netip.Prefix, int, netip.Addr, netip.Addr, error) {
	var zp netip.Prefix
	var za netip.Addr
	fail := func(field string, format string, a ...any) (netip.Prefix, int, netip.Addr, netip.Addr, error) {
		return zp, 0, za, za, &FieldError{Field: prefix + field, Err: fmt.Errorf(format, a...)}
	}
	if network == "" {
		return fail("Network", "missing")
	}
	n, err := netip.ParsePrefix(network)
	if err != nil {
		return fail("Network", "%q is not a CIDR prefix", network)
	}
	if n.Addr().Is6() != v6 || n.Addr().Is4In6() {
		want := "IPv4"
		if v6 {
			want = "IPv6"
		}
		return fail("Network", "%s is not an %s prefix", n, want)
	}
	if n.Masked() != n {
		return fail("Network", "%s has host bits set (did you mean %s?)", n, n.Masked())
	}
	sl := defLen
	if subnetLen != nil {
		sl = *subnetLen
	}
	if sl < n.Bits() || sl > n.Addr().BitLen() {
		return fail("SubnetLen", "%d must be at least the network's /%d and at most /%d", sl, n.Bits(), n.Addr().BitLen())
	}
	if sl-n.Bits() > 20 {
		return fail("SubnetLen", "/%d in %s gives more than 2^20 subnets; use a shorter SubnetLen", sl, n)
	}
	first := n.Addr()
	last := lastSubnet(n, sl)
	lo, hi := first, last
	if n.Bits() < sl && !v6 {
		// Like flannel, skip the network's first subnet (x.y.0.0) by default.
		lo = NextSubnet(first, sl)
	}
	parse := func(field, s string, def netip.Addr) (netip.Addr, error) {
		if s == "" {
			return def, nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return za, &FieldError{Field: prefix + field, Err: fmt.Errorf("%q is not an address", s)}
		}
		if !n.Contains(a) {
			return za, &FieldError{Field: prefix + field, Err: fmt.Errorf("%s is outside %s", a, n)}
		}
		if netip.PrefixFrom(a, sl).Masked().Addr() != a {
			return za, &FieldError{Field: prefix + field, Err: fmt.Errorf("%s is not the start of a /%d subnet", a, sl)}
		}
		return a, nil
	}
	if lo, err = parse("SubnetMin", min, lo); err != nil {
		return zp, 0, za, za, err
	}
	if hi, err = parse("SubnetMax", max, hi); err != nil {
		return zp, 0, za, za, err
	}
	if hi.Less(lo) {
		return fail("SubnetMax", "%s is below SubnetMin %s", hi, lo)
	}
	return n, sl, lo, hi, nil
}

// lastSubnet returns the first address of the last /sl subnet of n.
func lastSubnet(n netip.Prefix, sl int) netip.Addr {
	b := n.Addr().AsSlice()
	for i := n.Bits(); i < sl; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// NextSubnet returns the start of the /bits subnet after the one starting at a.
// It wraps to the zero address at the end of the address space.
func NextSubnet(a netip.Addr, bits int) netip.Addr {
	b := a.AsSlice()
	// Add 1 at bit position bits-1 (counting from the most significant bit).
	i := bits - 1
	carry := byte(0x80 >> (i % 8))
	for j := i / 8; j >= 0 && carry != 0; j-- {
		s := uint16(b[j]) + uint16(carry)
		b[j] = byte(s)
		carry = byte(s >> 8)
	}
	r, _ := netip.AddrFromSlice(b)
	return r
}

// SubnetCount returns how many /bits subnets lie between min and max inclusive.
func SubnetCount(min, max netip.Addr, bits int) int {
	return int(index(max, bits)-index(min, bits)) + 1
}

// SubnetAt returns the i-th /bits subnet counting from min.
func SubnetAt(min netip.Addr, bits, i int) netip.Prefix {
	hi, lo := u128(min)
	shift := uint(min.BitLen() - bits) // position of the subnet's last bit
	add := uint64(i)
	if shift >= 64 {
		hi += add << (shift - 64)
	} else {
		nlo := lo + add<<shift
		if nlo < lo {
			hi++
		}
		hi += add >> (64 - shift)
		lo = nlo
	}
	var b [16]byte
	for k := 0; k < 8; k++ {
		b[k] = byte(hi >> (56 - 8*k))
		b[8+k] = byte(lo >> (56 - 8*k))
	}
	a := netip.AddrFrom16(b)
	if min.Is4() {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, bits)
}

// index is the subnet number of a's /bits subnet (its bits above the host part).
func index(a netip.Addr, bits int) uint64 {
	hi, lo := u128(a)
	shift := uint(a.BitLen() - bits)
	if shift >= 64 {
		return hi >> (shift - 64)
	}
	return lo>>shift | hi<<(64-shift)
}

func u128(a netip.Addr) (hi, lo uint64) {
	b := a.As16()
	for k := 0; k < 8; k++ {
		hi = hi<<8 | uint64(b[k])
		lo = lo<<8 | uint64(b[8+k])
	}
	return hi, lo
}
