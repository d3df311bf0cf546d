package node

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/tunnel"
)

// status is the node as its socket and metrics show it: each part asked
// for its own state.
type status struct {
	node    string
	holder  *holder
	fw      *forwarder
	sp      speakers
	peering *peering
	// policy enforces NetworkPolicy (nil when off).
	policy  *policy.Controller
	started time.Time
	// checks report, live, why the node cannot forward (device, routes,
	// underlay; the lease store).
	checks []func() error
	// rotate rotates a backend's key and republishes it (nil when no
	// backend has one).
	rotate func(now bool) (api.RotatedKey, error)
}

// rotation is the key rotation of the backend with a key (nil when none
// has): the new key goes into the lease at once, and into a kernel device
// at the next reconcile.
func rotation(sp speakers, h *holder, fw *forwarder, log *slog.Logger) func(now bool) (api.RotatedKey, error) {
	r := sp.rotator()
	if r == nil {
		return nil
	}
	var mu sync.Mutex
	return func(now bool) (api.RotatedKey, error) {
		mu.Lock()
		defer mu.Unlock()
		k, err := r.RotateKey(now)
		if err != nil {
			return k, err
		}
		fw.kick()
		h.publish(sp.caps())
		log.Info("rotated the WireGuard key; publishing it", "public_key", k.PublicKey, "old_key_grace", k.OldKeyGrace)
		return k, nil
	}
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
	l, view := s.holder.current(), s.peering.view()
	doc := api.Status{Node: s.node, Version: version.Version, PID: os.Getpid(), NotReady: s.notReady(), MTU: s.fw.router.MTU(), Uptime: time.Since(s.started).Round(time.Second).String(),
		Lease: api.Lease{Node: l.Node, Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet, PublicIP: l.Attrs.PublicIP, PublicIPv6: l.Attrs.PublicIPv6,
			Backend: l.Attrs.Backend.Type, Port: l.Attrs.Backend.Port, Renewed: l.Renewed, Expiration: l.Expiration},
		Counters: s.fw.ctr.Snapshot(), Peers: s.withTraffic(view)}
	for _, c := range s.sp.counters() {
		maps.Copy(doc.Counters, c.Values)
	}
	s.sp.report(&doc)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(doc)
}

// withTraffic returns the peers with the datapath's traffic counts.
func (s *status) withTraffic(view []api.Peer) []api.Peer {
	byName := map[string]*tunnel.PeerStats{}
	for _, p := range s.fw.peers.Peers() {
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

// serveStatus listens on the status socket in runDir, replacing a stale
// one.
func serveStatus(runDir string, h http.Handler, log *slog.Logger) (*http.Server, error) {
	path := filepath.Join(runDir, api.SocketName)
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
			k, err := st.rotate(now)
			if err != nil {
				http.Error(w, "rotate key: "+err.Error(), http.StatusInternalServerError)
				return
			}
			json.NewEncoder(w).Encode(k)
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
