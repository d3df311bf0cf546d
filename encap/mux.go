package encap

import (
	"errors"
	"net/netip"
	"runtime"

	"github.com/tulle-net/tulle/internal/pool"
	"github.com/tulle-net/tulle/tunnel"
)

// Transport is a backend that moves packets itself: a tunnel.Transport for
// the peers it serves.
type Transport interface {
	tunnel.Transport
	// Serves reports whether the endpoint is one of its peers'.
	Serves(netip.AddrPort) bool
	// SetMTU follows an underlay MTU change.
	SetMTU(underlayMTU int)
}

// Mux presents several userspace backends to the datapath as one
// tunnel.Transport (as Tailscale's magicsock presents many paths as one
// wireguard-go Bind): each frame goes to the first backend that serves
// its endpoint, the rest to the default, and every backend's receivers
// feed the datapath. The datapath never learns how a packet travels.
type Mux struct {
	def    Transport
	others []Transport
	parts  *pool.Pool[[][]tunnel.Frame] // per backend: others..., def
}

var _ tunnel.Transport = (*Mux)(nil)

// NewMux returns a Mux over def (udp: it reaches any endpoint) and others.
func NewMux(def Transport, others ...Transport) *Mux {
	n := len(others) + 1
	return &Mux{def: def, others: others, parts: pool.New(runtime.GOMAXPROCS(0), func() *[][]tunnel.Frame {
		p := make([][]tunnel.Frame, n)
		return &p
	})}
}

// Send implements tunnel.Transport. Safe for concurrent use (one caller
// per TUN queue), as every backend's Send is.
func (m *Mux) Send(frames []tunnel.Frame) error {
	if len(m.others) == 0 {
		return m.def.Send(frames)
	}
	pp := m.parts.Get()
	defer m.parts.Put(pp)
	parts := *pp
	for i := range parts {
		parts[i] = parts[i][:0]
	}
	for i := range frames {
		k := len(m.others)
		for j, o := range m.others {
			if o.Serves(frames[i].Addr) {
				k = j
				break
			}
		}
		parts[k] = append(parts[k], frames[i])
	}
	var errs []error
	for i, p := range parts {
		if len(p) == 0 {
			continue
		}
		if err := m.backend(i).Send(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Mux) backend(i int) Transport {
	if i == len(m.others) {
		return m.def
	}
	return m.others[i]
}

// Receivers implements tunnel.Transport: every backend's.
func (m *Mux) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for i := range len(m.others) + 1 {
		fns = append(fns, m.backend(i).Receivers()...)
	}
	return fns
}

// SetMTU passes an underlay MTU change to every backend.
func (m *Mux) SetMTU(underlayMTU int) {
	for i := range len(m.others) + 1 {
		m.backend(i).SetMTU(underlayMTU)
	}
}

// Close implements tunnel.Transport: it closes every backend.
func (m *Mux) Close() error {
	var errs []error
	for i := range len(m.others) + 1 {
		errs = append(errs, m.backend(i).Close())
	}
	return errors.Join(errs...)
}

// None is the datapath's transport when no running backend moves packets
// itself (a WireGuard device carries every peer): the TUN keeps the
// cluster routes and addresses, and nothing crosses it to a peer.
type None struct{}

var _ Transport = None{}

func (None) Send([]tunnel.Frame) error       { return nil }
func (None) Receivers() []tunnel.ReceiveFunc { return nil }
func (None) Close() error                    { return nil }
func (None) Serves(netip.AddrPort) bool      { return false }
func (None) SetMTU(int)                      {}
