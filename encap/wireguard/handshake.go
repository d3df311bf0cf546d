package wireguard

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"time"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
)

// hsMessage is a handshake message queued for the handshake goroutine.
type hsMessage struct {
	buf  [initiationSize]byte
	n    int
	src  netip.AddrPort
	sock *udpsock.Socket
	km   *keyMaterial // the identity its mac1 is for
}

func messageSize(typ byte) int {
	switch typ {
	case typeInitiation:
		return initiationSize
	case typeResponse:
		return responseSize
	case typeCookie:
		return cookieSize
	}
	return -1
}

// handshakes is the handshake goroutine: it consumes handshake messages,
// sends initiations the datapath asked for, and runs the timers.
func (t *Transport) handshakes() {
	tk := time.NewTicker(tick)
	defer tk.Stop()
	s := newSender(t)
	for {
		select {
		case <-t.done:
			return
		case m := <-t.hsq:
			t.handle(&m)
		case p := <-t.kicks:
			p.kickPending.Store(false)
			t.initiate(p, false, p.offerPending.Swap(false))
		case <-tk.C:
			t.runTimers(s)
		}
	}
}

// underLoadAfter is how long the node stays under load after its
// handshake queue drains below the mark (wireguard-go's UnderLoadAfterTime):
// a flood that pauses does not find the gate open.
const underLoadAfter = time.Second

// underLoad reports whether handshakes are under load: the queue an
// eighth full now, or within underLoadAfter of it.
func (t *Transport) underLoad(now int64) bool {
	if len(t.hsq) >= handshakeQueue/8 {
		t.underLoadUntil.Store(now + int64(underLoadAfter))
		return true
	}
	return now < t.underLoadUntil.Load()
}

// handle processes one handshake message. Under load (see underLoad), a
// message without a valid cookie MAC is answered with a cookie reply and
// dropped, and each source is rate-limited.
func (t *Transport) handle(m *hsMessage) {
	msg := m.buf[:m.n]
	now := time.Now()
	if msg[0] != typeCookie && t.underLoad(mono()) {
		if !validMAC2(msg, t.cookies.cookie(m.src, now)) {
			var reply [cookieSize]byte
			t.cookies.createCookieReply(reply[:], msg, m.km, m.src, now)
			t.write(m.sock, m.src, reply[:])
			t.ctr.Add(CookiesSent, 1)
			return
		}
		if !t.limiter.allow(m.src.Addr(), now) {
			t.ctr.Add(DropRateLimited, 1)
			return
		}
	}
	switch msg[0] {
	case typeInitiation:
		t.consumeInitiation(m, now)
	case typeResponse:
		t.consumeResponse(m)
	case typeCookie:
		t.consumeCookie(m)
	}
}

func (t *Transport) consumeInitiation(m *hsMessage, now time.Time) {
	km := m.km
	snap := t.peers.Load()
	var p *peer
	in, err := consumeInitiation(m.buf[:m.n], km, func(pub Key) ([32]byte, bool) {
		p = snap.byKey[pub]
		if p == nil {
			return [32]byte{}, false
		}
		if st := p.static.Load(); st.km == km {
			return st.ss, st.ok
		}
		ss, err := dh(km.priv, pub) // to the previous key: rare, not cached
		return ss, err == nil
	})
	switch err {
	case nil:
	case errUnknown:
		t.ctr.Add(DropUnknownKey, 1)
		return
	default:
		t.ctr.Add(DropAuth, 1)
		return
	}
	mnow := mono()
	var resp [responseSize]byte
	p.mu.Lock()
	if p.removed || bytes.Compare(in.timestamp[:], p.lastTimestamp[:]) <= 0 || (p.lastConsumed != 0 && mnow-p.lastConsumed < int64(initiationMinInterval)) {
		p.mu.Unlock()
		t.ctr.Add(DropStaleHandshake, 1)
		return
	}
	p.lastTimestamp, p.lastConsumed = in.timestamp, mnow
	kp := &keypair{created: mnow, remote: in.hs.remoteIndex}
	kp.peer.Store(p)
	// The index is reserved until the keys are set: a transport message
	// meeting it in between finds no session, never a keypair without
	// ciphers.
	kp.local = t.newIndex(reservation)
	send, recv, err := createResponse(resp[:], &in.hs, p.pub, t.cfg.PresharedKey, kp.local)
	if err != nil {
		t.index.Delete(kp.local)
		p.mu.Unlock()
		t.ctr.Add(DropAuth, 1)
		return
	}
	kp.send, kp.recv = sessionAEAD(send), sessionAEAD(recv)
	t.index.Store(kp.local, kp)
	putMACs(resp[:], p.mac1Key, p.cookieLocked(mnow))
	copy(p.lastMAC1[:], resp[60:76])
	p.installLocked(kp)
	p.lastInit = mnow
	p.mu.Unlock()
	src := m.src
	p.endpoint.Store(&src)
	p.lastRecv.Store(mnow)
	t.write(m.sock, m.src, resp[:])
	p.sent(mnow)
	t.ctr.Add(HandshakesCompleted, 1)
}

func (t *Transport) consumeResponse(m *hsMessage) {
	msg := m.buf[:m.n]
	idx := binary.LittleEndian.Uint32(msg[8:])
	v, _ := t.index.Load(idx)
	p, _ := v.(*peer)
	if p == nil {
		t.ctr.Add(DropUnknownIndex, 1)
		return
	}
	mnow := mono()
	p.mu.Lock()
	var hs *handshake
	switch {
	case p.hs.state == hsInitiationSent && p.hs.localIndex == idx:
		hs = &p.hs
	case p.offerHS.state == hsInitiationSent && p.offerHS.localIndex == idx:
		hs = &p.offerHS // the answer to an offer data overtook
	default:
		p.mu.Unlock()
		t.ctr.Add(DropUnknownIndex, 1)
		return
	}
	send, recv, remote, err := consumeResponse(msg, hs, hs.km, t.cfg.PresharedKey)
	if err != nil {
		p.mu.Unlock()
		t.ctr.Add(DropAuth, 1)
		return
	}
	kp := &keypair{created: mnow, initiator: true, local: idx, remote: remote, send: sessionAEAD(send), recv: sessionAEAD(recv)}
	kp.peer.Store(p)
	kp.confirmed.Store(true)
	t.index.Store(idx, kp)
	p.installLocked(kp)
	staged := len(p.staged) > 0
	p.mu.Unlock()
	src := m.src
	p.endpoint.Store(&src)
	p.lastRecv.Store(mnow)
	t.ctr.Add(HandshakesCompleted, 1)
	if staged {
		p.flushStaged()
		return
	}
	// Confirm the session to the responder at once.
	s := t.senders.Get()
	s.keepalive(p, kp)
	t.senders.Put(s)
}

func (t *Transport) consumeCookie(m *hsMessage) {
	msg := m.buf[:m.n]
	v, _ := t.index.Load(binary.LittleEndian.Uint32(msg[4:]))
	var p *peer
	switch x := v.(type) {
	case *peer:
		p = x
	case *keypair:
		p = x.peer.Load()
	default:
		t.ctr.Add(DropUnknownIndex, 1)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	c, err := consumeCookieReply(msg, p.pub, p.lastMAC1)
	if err != nil {
		t.ctr.Add(DropAuth, 1)
		return
	}
	p.cookie, p.cookieAt = c, mono()
	t.ctr.Add(CookiesReceived, 1)
}

// cookieLocked returns the peer's cookie while it is fresh.
func (p *peer) cookieLocked(mnow int64) *[16]byte {
	if p.cookieAt == 0 || mnow-p.cookieAt >= int64(cookieRefresh) {
		return nil
	}
	return &p.cookie
}

// initiate sends an initiation to p. A first try is skipped while our
// last handshake message (an initiation, or a response to the peer's) is
// younger than RekeyTimeout: a second initiation would replace the one in
// flight, whose answer would then meet a forgotten index while the peer's
// flood limit drops the second; the retry of the first is due at
// RekeyTimeout anyway. One exception: data that comes while only an
// offer (an initiation nobody waited for: offer) is in flight sends its
// own at once, because the peer may have dropped the offer (it did not
// know this node yet) — and the offer stays answerable beside it.
func (t *Transport) initiate(p *peer, retry, offer bool) {
	mnow := mono()
	var msg [initiationSize]byte
	p.mu.Lock()
	st := p.static.Load()
	recent := p.lastInit != 0 && mnow-p.lastInit < int64(t.timers.RekeyTimeout)
	// Not when the peer's own handshake was answered meanwhile (p.next):
	// its session is on its way, and the data waits for it.
	overtake := !retry && !offer && p.offered && p.hs.state == hsInitiationSent && p.next == nil
	if p.removed || !st.ok || (!retry && recent && !overtake) {
		p.mu.Unlock()
		return
	}
	if p.attempt == 0 {
		p.attempt = mnow
	}
	switch {
	case overtake:
		if p.offerHS.state != hsNone {
			t.index.CompareAndDelete(p.offerHS.localIndex, p)
		}
		p.offerHS, p.offerUntil = p.hs, p.lastInit+int64(t.timers.RekeyTimeout)
	case p.hs.state != hsNone:
		t.index.CompareAndDelete(p.hs.localIndex, p)
	}
	if !retry {
		p.offered = offer
	}
	idx := t.newIndex(p)
	if err := createInitiation(msg[:], &p.hs, st.km, p.pub, st.ss, idx, time.Now()); err != nil {
		t.index.Delete(idx)
		p.mu.Unlock()
		return
	}
	putMACs(msg[:], p.mac1Key, p.cookieLocked(mnow))
	copy(p.lastMAC1[:], msg[116:132])
	p.lastInit = mnow
	p.retryAt = mnow + int64(t.timers.RekeyTimeout) + int64(randUint32()%334)*int64(time.Millisecond)
	p.mu.Unlock()
	t.write(nil, *p.endpoint.Load(), msg[:])
	p.sent(mnow)
	t.ctr.Add(HandshakesSent, 1)
}

// write sends one handshake message.
func (t *Transport) write(sk *udpsock.Socket, dst netip.AddrPort, msg []byte) {
	if sk == nil {
		if sk = t.socks.For(dst); sk == nil {
			t.ctr.Add(DropSend, 1)
			return
		}
	}
	if _, err := sk.Conn.WriteToUDPAddrPort(msg, dst); err != nil {
		t.ctr.Add(DropSend, 1)
		return
	}
	t.ctr.Add(DatagramsOut, 1)
}

// runTimers applies the protocol's timers to every peer: initiation
// retries and giving up, session expiry, passive and persistent
// keepalives, and a new handshake when sent data went unanswered.
func (t *Transport) runTimers(s *sender) {
	mnow := mono()
	T := &t.timers
	for _, p := range t.peers.Load().list {
		retry := false
		p.mu.Lock()
		if p.offerHS.state != hsNone && mnow >= p.offerUntil {
			t.index.CompareAndDelete(p.offerHS.localIndex, p)
			p.offerHS = handshake{}
		}
		if p.hs.state == hsInitiationSent && mnow >= p.retryAt {
			switch {
			case p.attempt == 0:
				// A session the peer started was confirmed meanwhile:
				// nothing waits for this one.
				t.index.CompareAndDelete(p.hs.localIndex, p)
				p.hs = handshake{}
			case mnow-p.attempt >= int64(T.RekeyAttemptTime):
				t.index.CompareAndDelete(p.hs.localIndex, p)
				p.hs, p.attempt = handshake{}, 0
				t.ctr.Add(HandshakesAbandoned, 1)
				p.dropStagedLocked(p.staged)
				p.staged = nil
			default:
				retry = true
			}
		}
		cur := p.cur.Load()
		if cur != nil && mnow-cur.created >= 3*int64(T.RejectAfterTime) {
			p.wipeLocked()
			cur = nil
		}
		for _, kp := range []**keypair{&p.prev, &p.next} {
			if *kp != nil && mnow-(*kp).created >= int64(T.RejectAfterTime) {
				t.index.CompareAndDelete((*kp).local, *kp)
				*kp = nil
			}
		}
		p.mu.Unlock()
		if retry {
			t.initiate(p, true, false)
		}
		usable := cur.usable(mnow, T)
		un := p.unanswered.Load()
		switch {
		case usable && un != 0 && mnow-un >= int64(T.KeepaliveTimeout):
			// Passive keepalive: data came and nothing went back for
			// KeepaliveTimeout since the first of it.
			s.keepalive(p, cur)
		case t.cfg.PersistentKeepalive > 0 && mnow-p.lastSent.Load() >= int64(t.cfg.PersistentKeepalive):
			if usable {
				s.keepalive(p, cur)
			} else {
				t.initiate(p, false, false)
			}
		}
		if ws := p.waitingSince.Load(); ws != 0 && mnow-ws >= int64(T.KeepaliveTimeout+T.RekeyTimeout) {
			p.waitingSince.Store(0)
			t.initiate(p, false, false)
		}
	}
}
