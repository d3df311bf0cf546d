package udpsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// sparseTTL is the TTL (hop limit) of what the sparse socket sends. A
// receiver's GRO merges only datagrams whose IP headers agree on it, so a
// sparse datagram is never appended to a train of bulk ones (and read
// from the bulk socket, behind them). 63 is one below Linux's default,
// and an underlay is never that many hops deep.
const sparseTTL = 63

// ListenSteered binds la as Listen does, plus a second socket on the
// same address, Sparse, in one SO_REUSEPORT group whose classic BPF
// program hands each received datagram to Sparse when the byte at
// offset off of its UDP payload has a bit of mask set, and to the first
// socket otherwise. Each socket is read by its own loop: datagrams a
// sender flags as sparse flows' skip whatever bulk traffic queues in the
// other's receive buffer.
//
// The port is first bound on its own, without SO_REUSEPORT: if another
// socket holds it (a second tulled on the host), that fails as Listen
// would, and the group is made only after. Where the kernel refuses the
// group or the program, the single socket is returned (Sparse nil); the
// socket's NoSparse says why.
func ListenSteered(la netip.AddrPort, noGSO, noGRO bool, off uint32, mask uint8) (*Socket, error) {
	if la.Port() != 0 {
		probe, err := bindUDP(la, Is6(la.Addr()), false)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", la, err)
		}
		probe.Close()
	}
	s, err := listen(la, noGSO, noGRO, true)
	if err != nil {
		// The group could not be made (no SO_REUSEPORT): a plain socket.
		s, err2 := Listen(la, noGSO, noGRO)
		if err2 != nil {
			return nil, err2
		}
		s.NoSparse = err
		return s, nil
	}
	sp, err := listen(s.LocalAddr(), noGSO, noGRO, true)
	if err == nil {
		err = steer(s, sp, off, mask)
		if err != nil {
			sp.Conn.Close()
		}
	}
	if err != nil {
		s.NoSparse = err
		return s, nil
	}
	s.Sparse = sp
	return s, nil
}

// steer attaches the group's program (through s) and sets the sparse
// socket's TTL.
func steer(s, sp *Socket, off uint32, mask uint8) error {
	prog, err := bpf.Assemble([]bpf.Instruction{
		// A load past the datagram's end returns 0: the first socket.
		bpf.LoadAbsolute{Off: off, Size: 1},
		bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: uint32(mask)},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipTrue: 1},
		bpf.RetConstant{Val: 1}, // the sparse socket: the group's second
		bpf.RetConstant{Val: 0},
	})
	if err != nil {
		return err
	}
	fp := unix.SockFprog{Len: uint16(len(prog)), Filter: (*unix.SockFilter)(unsafe.Pointer(&prog[0]))}
	if err := control(s, func(fd int) error {
		return unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fp)
	}); err != nil {
		return fmt.Errorf("SO_ATTACH_REUSEPORT_CBPF: %w", err)
	}
	return control(sp, func(fd int) error {
		if sp.V6 {
			return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, sparseTTL)
		}
		return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_TTL, sparseTTL)
	})
}

func control(s *Socket, f func(fd int) error) error {
	rc, err := s.Conn.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// reusePort is a net.ListenConfig Control that sets SO_REUSEPORT before
// bind.
func reusePort(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	return serr
}

// bindUDP binds la, in a SO_REUSEPORT group when reuse.
func bindUDP(la netip.AddrPort, v6, reuse bool) (*net.UDPConn, error) {
	network := "udp4"
	if v6 {
		network = "udp6"
	}
	if !reuse {
		return net.ListenUDP(network, net.UDPAddrFromAddrPort(la))
	}
	lc := net.ListenConfig{Control: reusePort}
	pc, err := lc.ListenPacket(context.Background(), network, la.String())
	if err != nil {
		return nil, err
	}
	c, ok := pc.(*net.UDPConn)
	if !ok {
		pc.Close()
		return nil, errors.New("not a UDP socket")
	}
	return c, nil
}
