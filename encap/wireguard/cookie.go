package wireguard

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/crypto/blake2s"
	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/time/rate"
)

// cookieRefresh is how long a cookie secret, and a cookie received, live.
const cookieRefresh = 120 * time.Second

// cookieJar makes the cookies this node asks initiators for when under
// load (the paper's §5.4.7): a MAC of the sender's address under a secret
// that changes every two minutes.
type cookieJar struct {
	mu      sync.Mutex
	secret  [32]byte
	created time.Time
}

func (j *cookieJar) cookie(src netip.AddrPort, now time.Time) [16]byte {
	j.mu.Lock()
	if now.Sub(j.created) > cookieRefresh {
		rand.Read(j.secret[:])
		j.created = now
	}
	secret := j.secret
	j.mu.Unlock()
	var b [18]byte
	a := src.Addr().As16()
	copy(b[:], a[:])
	binary.BigEndian.PutUint16(b[16:], src.Port())
	return mac(secret[:], b[:])
}

// createCookieReply answers handshake message msg (from src) with a
// cookie reply, written to out (cookieSize bytes).
func (j *cookieJar) createCookieReply(out, msg []byte, us *keyMaterial, src netip.AddrPort, now time.Time) {
	c := j.cookie(src, now)
	binary.LittleEndian.PutUint32(out[0:], typeCookie)
	copy(out[4:8], msg[4:8]) // the sender's index
	nonce := out[8:32]
	rand.Read(nonce)
	m1, m2 := macs(msg)
	a, _ := chacha20poly1305.NewX(us.cookieKey[:])
	a.Seal(out[32:32], nonce, c[:], msg[m1:m2])
}

// consumeCookieReply decrypts a cookie reply from peerPub to a message
// whose mac1 was lastMAC1.
func consumeCookieReply(msg []byte, peerPub Key, lastMAC1 [16]byte) ([16]byte, error) {
	var c [16]byte
	key := blake2s.Sum256(append([]byte(labelCookie), peerPub[:]...))
	a, _ := chacha20poly1305.NewX(key[:])
	if _, err := a.Open(c[:0], msg[8:32], msg[32:64], lastMAC1[:]); err != nil {
		return c, errDecrypt
	}
	return c, nil
}

// rateLimiter bounds handshakes per source address while under load: a
// token bucket per address (x/time/rate), at most maxEntries addresses
// remembered (the table is emptied when full: a flood of new addresses
// forgets old ones rather than growing memory).
type rateLimiter struct {
	mu      sync.Mutex
	buckets map[netip.Addr]*rate.Limiter
}

const (
	handshakeRate  = 20 // per second per address, under load
	handshakeBurst = 5
	maxEntries     = 4096
)

func (r *rateLimiter) allow(a netip.Addr, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.buckets == nil || len(r.buckets) >= maxEntries {
		r.buckets = map[netip.Addr]*rate.Limiter{}
	}
	l := r.buckets[a]
	if l == nil {
		l = rate.NewLimiter(handshakeRate, handshakeBurst)
		r.buckets[a] = l
	}
	return l.AllowN(now, 1)
}
