package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// hostVethName names the host side of an attachment's veth pair: stable, so
// DEL and GC find it without state, and unique per (container, interface).
func hostVethName(id, ifname string) string {
	h := sha256.Sum256([]byte(id + "/" + ifname))
	return "tl" + hex.EncodeToString(h[:])[:12]
}

// ensureBridge creates the node bridge if needed and gives it the gateway
// address of each node subnet, the MTU, and state up.
func ensureBridge(name string, mtu int, subnets []netip.Prefix) (*netlink.Bridge, error) {
	l, err := netlink.LinkByName(name)
	var br *netlink.Bridge
	switch {
	case err == nil:
		var ok bool
		if br, ok = l.(*netlink.Bridge); !ok {
			return nil, fmt.Errorf("%s exists and is a %s, not a bridge", name, l.Type())
		}
	case errors.As(err, new(netlink.LinkNotFoundError)):
		// A fixed MAC: a bridge left to pick one takes the lowest of its
		// ports' and changes it as pods come and go, leaving every pod's
		// ARP entry for the gateway stale.
		br = &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu, TxQLen: -1, HardwareAddr: bridgeMAC(name, subnets)}}
		if err := netlink.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			return nil, fmt.Errorf("bridge %s: %w", name, err)
		}
		br = l.(*netlink.Bridge)
	default:
		return nil, fmt.Errorf("bridge %s: %w", name, err)
	}
	if br.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(br, mtu); err != nil {
			return nil, fmt.Errorf("bridge %s mtu: %w", name, err)
		}
	}
	for _, p := range subnets {
		gw := &netlink.Addr{IPNet: &net.IPNet{IP: gateway(p).AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			gw.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(br, gw); err != nil {
			return nil, fmt.Errorf("bridge %s address %s: %w", name, gw.IPNet, err)
		}
	}
	if err := bridgeNetfilter(br); err != nil {
		return nil, fmt.Errorf("bridge %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("bridge %s up: %w", name, err)
	}
	return br, nil
}

// bridgeNetfilter makes the bridge hand the IPv4 and IPv6 packets it
// switches between pods to the IP hooks of netfilter (the bridge's own
// nf_call_iptables / nf_call_ip6tables, which br_netfilter honours
// whatever the namespace's net.bridge.bridge-nf-call-* sysctls say). Pod
// to pod on one node crosses no router: without this, a pod that reached
// a Service's ClusterIP gets the answer of an endpoint on the same bridge
// straight from the endpoint's address, past kube-proxy's reverse NAT,
// and drops it; NetworkPolicy would never see such traffic either.
func bridgeNetfilter(br *netlink.Bridge) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(br.Attrs().Index)
	req.AddData(msg)
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
	data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
	data.AddRtAttr(unix.IFLA_BR_NF_CALL_IPTABLES, []byte{1})
	data.AddRtAttr(unix.IFLA_BR_NF_CALL_IP6TABLES, []byte{1})
	req.AddData(info)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("set nf_call_iptables and nf_call_ip6tables: %w", err)
	}
	return nil
}

// bridgeMAC is a stable, locally administered unicast MAC for the bridge.
func bridgeMAC(name string, subnets []netip.Prefix) net.HardwareAddr {
	h := sha256.New()
	h.Write([]byte(name))
	for _, p := range subnets {
		h.Write([]byte(p.String()))
	}
	mac := net.HardwareAddr(h.Sum(nil)[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// setupVeth creates the pair with the container side in netns, attaches
// the host side to the bridge and sets hairpin mode.
func setupVeth(netns ns.NetNS, br *netlink.Bridge, ifname, hostName string, mtu int, hairpin bool) (host, cont net.Interface, err error) {
	err = netns.Do(func(hostNS ns.NetNS) error {
		h, c, err := ip.SetupVethWithName(ifname, hostName, mtu, "", hostNS)
		host, cont = h, c
		return err
	})
	if err != nil {
		return host, cont, err
	}
	hl, err := netlink.LinkByName(host.Name)
	if err != nil {
		return host, cont, fmt.Errorf("host veth %s: %w", host.Name, err)
	}
	if err := netlink.LinkSetMaster(hl, br); err != nil {
		return host, cont, fmt.Errorf("attach %s to %s: %w", host.Name, br.Name, err)
	}
	if err := netlink.LinkSetHairpin(hl, hairpin); err != nil {
		return host, cont, fmt.Errorf("hairpin on %s: %w", host.Name, err)
	}
	return host, cont, nil
}

// delLink deletes a link by name; a missing link is not an error.
func delLink(name string) error {
	l, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// disableDAD turns duplicate address detection off for ifname in the
// current namespace: pod addresses are allocated, not guessed, and DAD
// would hold IPv6 traffic back for a second or more.
func disableDAD(ifname string) {
	os.WriteFile("/proc/sys/net/ipv6/conf/"+ifname+"/accept_dad", []byte("0"), 0o644)
}
