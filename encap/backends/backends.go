// Package backends is the table of the backends tulled speaks, in
// preference order (within a class of path, auto mode prefers the earlier
// row). Adding a backend is a package under encap/ and a row here; see
// docs/architecture.md, "Adding a backend".
package backends

import (
	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/encap/hostgw"
	"github.com/tulle-net/tulle/encap/udp"
	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/encap/wireguard"
)

// New returns a fresh table (each row holds its own flags).
func New() encap.Table {
	return encap.Table{
		hostgw.NewBackend(),    // plain routes on one L2 segment
		udp.NewBackend(),       // tulle's own userspace encapsulation; the fallback
		vxlan.NewBackend(),     // the kernel's VXLAN, else VXLAN from the datapath
		wireguard.NewBackend(), // encrypted: only when net-conf asks, then alone
	}
}
