package node

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
)

// findUnderlay resolves --iface/--public-ip/--public-ipv6 against the
// system. Every failure is a configuration error.
func findUnderlay(c Config) (encap.Underlay, error) {
	u := encap.Underlay{IP4: c.PublicIP, IP6: c.PublicIPv6}
	var link netlink.Link
	var err error
	switch {
	case c.Iface != "":
		if link, err = netlink.LinkByName(c.Iface); err != nil {
			return u, netconf.Errorf("flag --iface: no interface %q", c.Iface)
		}
	case c.PublicIP.IsValid() || c.PublicIPv6.IsValid():
		want := c.PublicIP
		if !want.IsValid() {
			want = c.PublicIPv6
		}
		if link, err = linkWithAddr(want); err != nil {
			return u, err
		}
	default:
		if link, err = defaultRouteLink(); err != nil {
			return u, err
		}
	}
	u.Iface, u.MTU = link.Attrs().Name, link.Attrs().MTU
	addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return u, fmt.Errorf("addresses of %s: %w", u.Iface, err)
	}
	have := func(a netip.Addr) bool {
		return slices.ContainsFunc(addrs, func(x netlink.Addr) bool { ip, _ := netip.AddrFromSlice(x.IP); return ip.Unmap() == a })
	}
	if u.IP4.IsValid() && !have(u.IP4) {
		return u, netconf.Errorf("flag --public-ip: %s is not an address of %s", u.IP4, u.Iface)
	}
	if u.IP6.IsValid() && !have(u.IP6) {
		return u, netconf.Errorf("flag --public-ipv6: %s is not an address of %s", u.IP6, u.Iface)
	}
	if !u.IP4.IsValid() && !u.IP6.IsValid() {
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP)
			ip = ip.Unmap()
			if ip.Is4() && ip.IsGlobalUnicast() && !u.IP4.IsValid() {
				u.IP4 = ip
			}
		}
		if !u.IP4.IsValid() {
			for _, a := range addrs {
				ip, _ := netip.AddrFromSlice(a.IP)
				if ip.Is6() && !ip.Is4In6() && ip.IsGlobalUnicast() && !u.IP6.IsValid() {
					u.IP6 = ip
				}
			}
		}
		if !u.IP4.IsValid() && !u.IP6.IsValid() {
			return u, netconf.Errorf("flag --iface: %s has no usable address", u.Iface)
		}
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && a.IPNet != nil {
			ones, _ := a.Mask.Size()
			if p := netip.PrefixFrom(ip.Unmap(), ones).Masked(); ip.IsGlobalUnicast() && ones > 0 {
				u.OnLink = append(u.OnLink, p)
			}
		}
	}
	return u, nil
}

func linkWithAddr(a netip.Addr) (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
		for _, x := range addrs {
			if ip, _ := netip.AddrFromSlice(x.IP); ip.Unmap() == a {
				return l, nil
			}
		}
	}
	return nil, netconf.Errorf("public address %s is on no interface of this host", a)
}

func defaultRouteLink() (netlink.Link, error) {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Dst: nil}, 0)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
					return l, nil
				}
			}
		}
	}
	return nil, netconf.Errorf("no default route: name the underlay with --iface or --public-ip")
}

// public returns the underlay addresses peers send to.
func public(u encap.Underlay) []netip.Addr {
	var a []netip.Addr
	for _, ip := range []netip.Addr{u.IP4, u.IP6} {
		if ip.IsValid() {
			a = append(a, ip)
		}
	}
	return a
}

func networks(c *netconf.Config) []netip.Prefix {
	var n []netip.Prefix
	if c.EnableIPv4 {
		n = append(n, c.Network)
	}
	if c.EnableIPv6 {
		n = append(n, c.IPv6Network)
	}
	return n
}
