package wireguard

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// ProbeKernel reports whether the kernel has WireGuard: it creates a
// WireGuard link under a throwaway name and removes it again. Never
// assumed from the kernel version or the module list.
func ProbeKernel() error {
	name := fmt.Sprintf("tulle-wgp%04x", randUint32()&0xffff)
	l := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := netlink.LinkAdd(l); err != nil {
		return fmt.Errorf("create a wireguard link: %w", err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return errors.Join(errors.New("remove the probe's wireguard link "+name), err)
	}
	return nil
}
