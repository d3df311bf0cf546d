package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/encap/udp"
	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/tunnel"
)

// status is what GET /v1/status on the status socket returns.
type status struct {
	node   string
	ctr    *tunnel.Counters
	udpCtr *udp.Counters
	vxCtr  *vxlan.Counters
	wgCtr  *wireguard.Counters
	wg     *wg // nil unless WireGuard is configured
	// rotate rotates the WireGuard key and republishes it (nil without
	// WireGuard).
	rotate func(now bool) (wireguard.Key, time.Duration, error)
	wgPort uint16
	peers  *tunnel.PeerTable
	// policy enforces NetworkPolicy (nil when off).
	policy  *policy.Controller
	mtu     func() int
	started time.Time
	// checks report, live, why the node cannot forward (device, routes,
	// underlay; the lease store).
	checks []func() error

	// stopped is set when the datapath's loops ended (liveness).
	stopped atomic.Bool
	// renewOK and renewErr count lease renewals; snapshots the peer
	// snapshots from the store.
	renewOK, renewErr, snapshots atomic.Uint64

	mu    sync.Mutex
	lease lease.Lease // as last renewed
	view  []api.Peer  // the last plan: every peer, its backend and why
}

func (s *status) setPeers(v []api.Peer) {
	s.mu.Lock()
	s.view = v
	s.mu.Unlock()
}

func (s *status) setLease(l lease.Lease) {
	s.mu.Lock()
	s.lease = l
	s.mu.Unlock()
}

func (s *status) notReady() string {
	for _, c := range s.checks {
		if err := c(); err != nil {
			return err.Error()
		}
	}
	return ""
}

func (s *status) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != api.StatusPath {
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	l, view := s.lease, s.view
	s.mu.Unlock()
	doc := api.Status{Node: s.node, Version: version.Version, PID: os.Getpid(), NotReady: s.notReady(), MTU: s.mtu(), Uptime: time.Since(s.started).Round(time.Second).String(),
		Lease: api.Lease{Node: l.Node, Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet, PublicIP: l.Attrs.PublicIP, PublicIPv6: l.Attrs.PublicIPv6,
			Backend: l.Attrs.Backend.Type, Port: l.Attrs.Backend.Port, Renewed: l.Renewed, Expiration: l.Expiration},
		Counters: s.ctr.Snapshot(), Peers: s.withTraffic(view)}
	s.udpCtr.SnapshotInto(doc.Counters)
	s.vxCtr.SnapshotInto(doc.Counters)
	if s.wg != nil {
		s.wgCtr.SnapshotInto(doc.Counters)
		s.wireGuardStatus(&doc)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(doc)
}

// withTraffic returns the peers with the datapath's traffic counts.
func (s *status) withTraffic(view []api.Peer) []api.Peer {
	byName := map[string]*tunnel.PeerStats{}
	for _, p := range s.peers.Peers() {
		byName[p.Name] = p.Stats
	}
	out := slices.Clone(view)
	for i := range out {
		if st := byName[out[i].Name]; st != nil {
			out[i].Traffic = &api.PeerTraffic{TxFrames: st.TxFrames.Load(), TxBytes: st.TxBytes.Load(), RxFrames: st.RxFrames.Load(),
				RxBytes: st.RxBytes.Load(), Drops: st.Drops.Load(), LastSeen: st.LastSeen()}
		}
	}
	return out
}

// wireGuardStatus adds this node's WireGuard identity and each peer's
// session state to doc.
func (s *status) wireGuardStatus(doc *api.Status) {
	pub := s.wg.PublicKey()
	doc.WireGuard = &api.WireGuardNode{PublicKey: pub.String(), Fingerprint: pub.Fingerprint(), Port: s.wgPort, Mode: s.wg.mode()}
	byName := map[string]wireguard.PeerStatus{}
	for _, p := range s.wg.Status() {
		byName[p.Name] = p
	}
	peers := slices.Clone(doc.Peers)
	for i := range peers {
		p, ok := byName[peers[i].Name]
		if !ok {
			continue
		}
		w := &api.WireGuardPeer{PublicKey: p.Key.String(), Fingerprint: p.Key.Fingerprint(), Endpoint: p.Endpoint,
			LastHandshake: p.LastHandshake, RxBytes: p.RxBytes, TxBytes: p.TxBytes, Refused: p.Refused}
		if s.wg.dev == nil && peers[i].Traffic != nil {
			w.RxBytes, w.TxBytes = peers[i].Traffic.RxBytes, peers[i].Traffic.TxBytes
		}
		peers[i].WireGuard = w
	}
	doc.Peers = peers
}

// serveStatus listens on a unix socket at path, replacing a stale one.
func serveStatus(path string, h http.Handler, log *slog.Logger) (*http.Server, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	// The socket is mode 0600 (root only), so pprof is safe to expose on
	// it; it is how datapath time is profiled in the field.
	mux := http.NewServeMux()
	mux.Handle(api.StatusPath, h)
	if st, ok := h.(*status); ok {
		// For a DaemonSet readiness probe (exec through the socket, or
		// tullectl status): 200 when forwarding with a healthy store.
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
			if why := st.notReady(); why != "" {
				http.Error(w, why, http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
	}
	if st, ok := h.(*status); ok {
		mux.HandleFunc(api.RotateKeyPath, func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodPost {
				http.Error(w, "POST only", http.StatusMethodNotAllowed)
				return
			}
			if st.rotate == nil {
				http.Error(w, "this node does not speak WireGuard (net-conf Backend.Type)", http.StatusConflict)
				return
			}
			now, err := strconv.ParseBool(cmp.Or(r.URL.Query().Get("now"), "false"))
			if err != nil {
				http.Error(w, "rotate key: parameter now: "+err.Error(), http.StatusBadRequest)
				return
			}
			k, grace, err := st.rotate(now)
			if err != nil {
				http.Error(w, "rotate key: "+err.Error(), http.StatusInternalServerError)
				return
			}
			json.NewEncoder(w).Encode(api.RotatedKey{PublicKey: k.Public().String(), Fingerprint: k.Public().Fingerprint(), OldKeyGrace: grace})
		})
	}
	if st, ok := h.(*status); ok {
		mux.HandleFunc(api.PolicyPath, st.servePolicy)
		mux.HandleFunc(api.AttachPath, st.serveAttach)
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("status socket: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("status server", "err", err)
		}
	}()
	return srv, nil
}

// servePolicy answers GET /v1/policy: the node's NetworkPolicy state.
func (s *status) servePolicy(w http.ResponseWriter, r *http.Request) {
	doc := api.PolicyStatus{}
	if s.policy != nil {
		doc = s.policy.Status()
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(doc)
}

// attachTimeout bounds how long an ADD waits for its pod's rules; the
// runtime retries an ADD that fails.
const attachTimeout = 30 * time.Second

// serveAttach takes the CNI plugin's attachments: POST (ADD) answers once
// the pod's rules are in place, DELETE ?containerID= (DEL) forgets one.
// Without NetworkPolicy both succeed at once.
func (s *status) serveAttach(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodPost:
		var a api.Attachment
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&a); err != nil {
			http.Error(w, "attachment: "+err.Error(), http.StatusBadRequest)
			return
		}
		if s.policy == nil {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), attachTimeout)
		defer cancel()
		if err := s.policy.Attach(ctx, a); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case http.MethodDelete:
		if id := r.URL.Query().Get("containerID"); s.policy != nil && id != "" {
			s.policy.Detach(id)
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		http.Error(w, "POST or DELETE", http.StatusMethodNotAllowed)
	}
}
