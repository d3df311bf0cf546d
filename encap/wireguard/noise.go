package wireguard

import (
	"crypto/cipher"
	"crypto/hmac"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"hash"
	"time"

	"golang.org/x/crypto/blake2s"
	"golang.org/x/crypto/chacha20poly1305"
)

// The protocol's names (the WireGuard paper, §5.4).
const (
	construction = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
	identifier   = "WireGuard v1 zx2c4 Jason@zx2c4.com"
	labelMAC1    = "mac1----"
	labelCookie  = "cookie--"
)

// Message types and sizes.
const (
	typeInitiation = 1
	typeResponse   = 2
	typeCookie     = 3
	typeTransport  = 4

	initiationSize = 148
	responseSize   = 92
	cookieSize     = 64
	// HeaderLen is a transport message's header (type, receiver index,
	// counter) and TagLen its Poly1305 tag: Overhead in all, besides the
	// padding of the plaintext to a multiple of padding.
	HeaderLen = 16
	TagLen    = 16
	Overhead  = HeaderLen + TagLen
	padding   = 16

	keepaliveSize = Overhead
)

var (
	initialChainKey [32]byte
	initialHash     [32]byte
	zeroNonce       [chacha20poly1305.NonceSize]byte
)

func init() {
	initialChainKey = blake2s.Sum256([]byte(construction))
	initialHash = mixHash(initialChainKey, []byte(identifier))
}

func newBlake2s() hash.Hash {
	h, _ := blake2s.New256(nil)
	return h
}

func mixHash(h [32]byte, data []byte) [32]byte {
	b := newBlake2s()
	b.Write(h[:])
	b.Write(data)
	var out [32]byte
	b.Sum(out[:0])
	return out
}

func hmacSum(key []byte, in ...[]byte) [32]byte {
	m := hmac.New(newBlake2s, key)
	for _, b := range in {
		m.Write(b)
	}
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// kdf is the paper's HKDF over HMAC-BLAKE2s, returning n (1–3) keys.
func kdf(n int, key [32]byte, input []byte) (t0, t1, t2 [32]byte) {
	prk := hmacSum(key[:], input)
	t0 = hmacSum(prk[:], []byte{1})
	if n > 1 {
		t1 = hmacSum(prk[:], t0[:], []byte{2})
	}
	if n > 2 {
		t2 = hmacSum(prk[:], t1[:], []byte{3})
	}
	return
}

// mac is keyed BLAKE2s-128.
func mac(key, data []byte) [16]byte {
	m, _ := blake2s.New128(key)
	m.Write(data)
	var out [16]byte
	m.Sum(out[:0])
	return out
}

func aeadSeal(dst []byte, key [32]byte, plain, ad []byte) []byte {
	a, _ := chacha20poly1305.New(key[:])
	return a.Seal(dst, zeroNonce[:], plain, ad)
}

func aeadOpen(dst []byte, key [32]byte, sealed, ad []byte) ([]byte, error) {
	a, _ := chacha20poly1305.New(key[:])
	return a.Open(dst, zeroNonce[:], sealed, ad)
}

// tai64n is the handshake timestamp: TAI64 seconds and nanoseconds,
// the nanoseconds rounded down to 2^24 ns (as wireguard-go does) so the
// timestamp leaks no fine timing.
func tai64n(t time.Time) [12]byte {
	var b [12]byte
	binary.BigEndian.PutUint64(b[:], 0x400000000000000a+uint64(t.Unix()))
	binary.BigEndian.PutUint32(b[8:], uint32(t.Nanosecond())&^(1<<24-1))
	return b
}

// Errors of message handling; each maps to a drop counter.
var (
	errDecrypt = errors.New("authentication failed")
	errUnknown = errors.New("unknown peer or index")
	errState   = errors.New("unexpected handshake state")
)

// keyMaterial is this node's static identity, precomputed per key.
type keyMaterial struct {
	priv, pub Key
	// hash is H after mixing our public key: where consuming an
	// initiation to us starts. mac1Key and cookieKey key the MACs peers
	// compute over messages to us and the cookies we send.
	hash               [32]byte
	mac1Key, cookieKey [32]byte
}

func newKeyMaterial(priv Key) *keyMaterial {
	pub := priv.Public()
	return &keyMaterial{priv: priv, pub: pub, hash: mixHash(initialHash, pub[:]),
		mac1Key:   blake2s.Sum256(append([]byte(labelMAC1), pub[:]...)),
		cookieKey: blake2s.Sum256(append([]byte(labelCookie), pub[:]...))}
}

// handshake is one peer's handshake in progress.
type handshake struct {
	state       int
	km          *keyMaterial // our identity the initiation was made with
	chainKey    [32]byte
	hash        [32]byte
	ephemeral   Key // our ephemeral private key
	remoteEph   Key
	localIndex  uint32
	remoteIndex uint32
}

const (
	hsNone = iota
	hsInitiationSent
	hsInitiationConsumed
)

// createInitiation fills msg (initiationSize bytes, MACs excluded) as
// the initiator, and hs with the state the response continues.
func createInitiation(msg []byte, hs *handshake, us *keyMaterial, peerPub Key, ss [32]byte, index uint32, now time.Time) error {
	eph, err := NewPrivateKey()
	if err != nil {
		return err
	}
	ephPub := eph.Public()
	ck, h := initialChainKey, mixHash(initialHash, peerPub[:])
	binary.LittleEndian.PutUint32(msg[0:], typeInitiation)
	binary.LittleEndian.PutUint32(msg[4:], index)
	copy(msg[8:40], ephPub[:])
	ck, _, _ = kdf(1, ck, ephPub[:])
	h = mixHash(h, ephPub[:])
	es, err := dh(eph, peerPub)
	if err != nil {
		return err
	}
	var k [32]byte
	ck, k, _ = kdf(2, ck, es[:])
	aeadSeal(msg[40:40], k, us.pub[:], h[:])
	h = mixHash(h, msg[40:88])
	ck, k, _ = kdf(2, ck, ss[:])
	ts := tai64n(now)
	aeadSeal(msg[88:88], k, ts[:], h[:])
	h = mixHash(h, msg[88:116])
	*hs = handshake{state: hsInitiationSent, km: us, chainKey: ck, hash: h, ephemeral: eph, localIndex: index}
	return nil
}

// initiation is a consumed initiation: who sent it and the state for the
// response.
type initiation struct {
	peerPub   Key
	timestamp [12]byte
	hs        handshake
}

// consumeInitiation authenticates an initiation to us (MACs checked by
// the caller) and returns its sender's static key; the caller looks the
// peer up and finishes with the static-static DH it knows.
func consumeInitiation(msg []byte, us *keyMaterial, staticStatic func(Key) ([32]byte, bool)) (initiation, error) {
	var in initiation
	var ephPub Key
	copy(ephPub[:], msg[8:40])
	ck, h := initialChainKey, us.hash
	ck, _, _ = kdf(1, ck, ephPub[:])
	h = mixHash(h, ephPub[:])
	es, err := dh(us.priv, ephPub)
	if err != nil {
		return in, errDecrypt
	}
	var k [32]byte
	ck, k, _ = kdf(2, ck, es[:])
	var pub [32]byte
	if _, err := aeadOpen(pub[:0], k, msg[40:88], h[:]); err != nil {
		return in, errDecrypt
	}
	h = mixHash(h, msg[40:88])
	in.peerPub = pub
	ss, ok := staticStatic(in.peerPub)
	if !ok {
		return in, errUnknown
	}
	ck, k, _ = kdf(2, ck, ss[:])
	if _, err := aeadOpen(in.timestamp[:0], k, msg[88:116], h[:]); err != nil {
		return in, errDecrypt
	}
	h = mixHash(h, msg[88:116])
	in.hs = handshake{state: hsInitiationConsumed, chainKey: ck, hash: h, remoteEph: ephPub,
		remoteIndex: binary.LittleEndian.Uint32(msg[4:])}
	return in, nil
}

// createResponse fills msg (responseSize bytes, MACs excluded) for a
// consumed initiation and returns the session keys (send, receive).
func createResponse(msg []byte, hs *handshake, peerPub, psk Key, index uint32) (send, recv [32]byte, err error) {
	if hs.state != hsInitiationConsumed {
		return send, recv, errState
	}
	eph, err := NewPrivateKey()
	if err != nil {
		return send, recv, err
	}
	ephPub := eph.Public()
	binary.LittleEndian.PutUint32(msg[0:], typeResponse)
	binary.LittleEndian.PutUint32(msg[4:], index)
	binary.LittleEndian.PutUint32(msg[8:], hs.remoteIndex)
	copy(msg[12:44], ephPub[:])
	ck, h := hs.chainKey, hs.hash
	ck, _, _ = kdf(1, ck, ephPub[:])
	h = mixHash(h, ephPub[:])
	ee, err := dh(eph, hs.remoteEph)
	if err != nil {
		return send, recv, err
	}
	ck, _, _ = kdf(1, ck, ee[:])
	se, err := dh(eph, peerPub)
	if err != nil {
		return send, recv, err
	}
	ck, _, _ = kdf(1, ck, se[:])
	ck, tau, k := kdf(3, ck, psk[:])
	h = mixHash(h, tau[:])
	aeadSeal(msg[44:44], k, nil, h[:])
	// The responder receives with the first key and sends with the second.
	recv, send, _ = kdf(2, ck, nil)
	*hs = handshake{}
	return send, recv, nil
}

// consumeResponse authenticates a response to our initiation hs and
// returns the session keys (send, receive) and the peer's index.
func consumeResponse(msg []byte, hs *handshake, us *keyMaterial, psk Key) (send, recv [32]byte, remote uint32, err error) {
	if hs.state != hsInitiationSent {
		return send, recv, 0, errState
	}
	var ephPub Key
	copy(ephPub[:], msg[12:44])
	ck, h := hs.chainKey, hs.hash
	ck, _, _ = kdf(1, ck, ephPub[:])
	h = mixHash(h, ephPub[:])
	ee, err := dh(hs.ephemeral, ephPub)
	if err != nil {
		return send, recv, 0, errDecrypt
	}
	ck, _, _ = kdf(1, ck, ee[:])
	se, err := dh(us.priv, ephPub)
	if err != nil {
		return send, recv, 0, errDecrypt
	}
	ck, _, _ = kdf(1, ck, se[:])
	ck, tau, k := kdf(3, ck, psk[:])
	h = mixHash(h, tau[:])
	if _, err := aeadOpen(nil, k, msg[44:60], h[:]); err != nil {
		return send, recv, 0, errDecrypt
	}
	send, recv, _ = kdf(2, ck, nil)
	remote = binary.LittleEndian.Uint32(msg[4:])
	*hs = handshake{}
	return send, recv, remote, nil
}

// macs returns where a handshake message's mac1 and mac2 start.
func macs(msg []byte) (m1, m2 int) { return len(msg) - 32, len(msg) - 16 }

// putMACs writes mac1 (keyed with the receiver's mac1 key) and mac2
// (keyed with a cookie, zeros without one).
func putMACs(msg []byte, mac1Key [32]byte, cookie *[16]byte) {
	m1, m2 := macs(msg)
	s := mac(mac1Key[:], msg[:m1])
	copy(msg[m1:], s[:])
	if cookie == nil {
		clear(msg[m2:])
		return
	}
	s = mac(cookie[:], msg[:m2])
	copy(msg[m2:], s[:])
}

// validMAC1 checks a handshake message's mac1 against our key.
func validMAC1(msg []byte, us *keyMaterial) bool {
	m1, m2 := macs(msg)
	s := mac(us.mac1Key[:], msg[:m1])
	return subtle.ConstantTimeCompare(s[:], msg[m1:m2]) == 1
}

// validMAC2 checks mac2 against the cookie the sender should hold.
func validMAC2(msg []byte, cookie [16]byte) bool {
	_, m2 := macs(msg)
	s := mac(cookie[:], msg[:m2])
	return subtle.ConstantTimeCompare(s[:], msg[m2:]) == 1
}

// sessionAEAD makes a session's cipher.
func sessionAEAD(k [32]byte) cipher.AEAD {
	a, _ := chacha20poly1305.New(k[:])
	return a
}
