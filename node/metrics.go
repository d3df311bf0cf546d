package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/version"
	"github.com/tulle-net/tulle/tunnel"
)

// web serves /healthz, /readyz and /metrics: up before the lease is held
// (st is nil until then), so a probe sees "starting" rather than nothing.
type web struct {
	st  atomic.Pointer[status]
	srv *http.Server // nil when off
}

// serve has the endpoints answer for the running node.
func (h *web) serve(st *status) { h.st.Store(st) }

// Close stops serving.
func (h *web) Close() error {
	if h.srv == nil {
		return nil
	}
	return h.srv.Close()
}

// serveHTTP serves /healthz, /readyz and /metrics on addr (TCP; "" off).
func serveHTTP(addr string, log *slog.Logger) (*web, error) {
	h := &web{}
	if addr == "" {
		return h, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, netconf.Errorf("flag --http-addr: %v", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), &collector{h: h})
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		// Alive: the process serves, and once running its loops do.
		if st := h.st.Load(); st != nil && st.fw.stopped.Load() {
			http.Error(w, "datapath stopped", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		st := h.st.Load()
		why := "starting: no lease held yet"
		if st != nil {
			why = st.notReady()
		}
		if why != "" {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	h.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := h.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("http server stopped", "addr", addr, "err", err)
		}
	}()
	log.Info("serving health and metrics", "addr", ln.Addr().String())
	return h, nil
}

// collector exports tulled's counters at scrape time: no second count on
// the packet path.
type collector struct{ h *web }

var (
	descBuild        = prometheus.NewDesc("tulle_build_info", "tulled's build: version and Go toolchain.", []string{"version", "goversion"}, nil)
	descReady        = prometheus.NewDesc("tulle_ready", "1 when the node forwards with a healthy store (as /readyz).", nil, nil)
	descBytes        = prometheus.NewDesc("tulle_datapath_bytes_total", "IP bytes through tulled's datapath.", []string{"direction"}, nil)
	descFrames       = prometheus.NewDesc("tulle_datapath_frames_total", "Frames through tulled's datapath (a super-packet counts once).", []string{"direction"}, nil)
	descPeerBytes    = prometheus.NewDesc("tulle_backend_bytes_total", "IP bytes through the datapath by the backend serving the peer.", []string{"backend", "direction"}, nil)
	descPeerFrames   = prometheus.NewDesc("tulle_backend_frames_total", "Frames through the datapath by the backend serving the peer.", []string{"backend", "direction"}, nil)
	descDatagrams    = prometheus.NewDesc("tulle_backend_datagrams_total", "UDP datagrams sent and received by a userspace backend.", []string{"backend", "direction"}, nil)
	descPolicyDrop   = prometheus.NewDesc("tulle_policy_dropped_packets_total", "Packets NetworkPolicy dropped on this node: ingress or egress denied, or from/to a local address no attached pod holds (unattached).", []string{"reason"}, nil)
	descPolicyDenied = prometheus.NewDesc("tulle_policy_denied_packets_total", "Packets denied to or from a local pod, counted once for each NetworkPolicy isolating that pod (only policies selecting a local pod appear).", []string{"policy", "direction"}, nil)
	descIsolated     = prometheus.NewDesc("tulle_policy_isolated_pods", "Local pods a NetworkPolicy isolates, by direction.", []string{"direction"}, nil)
	descDrops        = prometheus.NewDesc("tulle_drops_total", "Packets, datagrams or frames dropped, by component and reason.", []string{"component", "reason"}, nil)
	descEvents       = prometheus.NewDesc("tulle_events_total", "Other counted events, by component.", []string{"component", "event"}, nil)
	descPeers        = prometheus.NewDesc("tulle_peers", "Peers by the backend serving them (none: unreachable).", []string{"backend"}, nil)
	descExpiry       = prometheus.NewDesc("tulle_lease_expiry_timestamp_seconds", "When the node's lease expires unless renewed (Unix time).", nil, nil)
	descRenewals     = prometheus.NewDesc("tulle_lease_renewals_total", "Lease renewals, by result.", []string{"result"}, nil)
	descSnapshots    = prometheus.NewDesc("tulle_store_snapshots_total", "Peer snapshots received from the lease store.", nil, nil)
	descMTU          = prometheus.NewDesc("tulle_mtu_bytes", "The TUN (and pod) MTU.", nil, nil)
	descBatch        = prometheus.NewDesc("tulle_datapath_batch_frames", "Frames moved per TUN read (tx) or per receive (rx).", []string{"direction"}, nil)
)

func (c *collector) Describe(chan<- *prometheus.Desc) {} // unchecked: the label sets follow the counters

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(descBuild, prometheus.GaugeValue, 1, version.Version, runtime.Version())
	st := c.h.st.Load()
	if st == nil {
		ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, 0)
		return
	}
	ready := 0.0
	if st.notReady() == "" {
		ready = 1
	}
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, ready)
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	if st.policy != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if d, err := st.policy.Dropped(ctx); err == nil {
			for reason, v := range d.ByReason {
				counter(descPolicyDrop, v, reason)
			}
			for pol, v := range d.ByPolicy {
				name, dir, _ := strings.Cut(pol, " ")
				counter(descPolicyDenied, v, name, dir)
			}
		}
		cancel()
		var in, eg float64
		for _, p := range st.policy.Status().Pods {
			if p.IngressIsolated {
				in++
			}
			if p.EgressIsolated {
				eg++
			}
		}
		st.policy.AttachSeconds().Collect(ch)
		ch <- prometheus.MustNewConstMetric(descIsolated, prometheus.GaugeValue, in, "ingress")
		ch <- prometheus.MustNewConstMetric(descIsolated, prometheus.GaugeValue, eg, "egress")
	}
	dp := st.fw.ctr.Snapshot()
	counter(descBytes, dp["tx_bytes"], "tx")
	counter(descBytes, dp["rx_bytes"], "rx")
	counter(descFrames, dp["tx_frames"], "tx")
	counter(descFrames, dp["rx_frames"], "rx")
	components := append([]encap.Counters{{Component: "datapath", Values: dp}}, st.sp.counters()...)
	for _, comp := range components {
		for name, v := range comp.Values {
			name = strings.TrimPrefix(name, comp.Prefix)
			switch {
			case comp.Component == "datapath" && (strings.HasSuffix(name, "_bytes") || strings.HasSuffix(name, "_frames")):
			case name == "datagrams_out":
				counter(descDatagrams, v, comp.Component, "out")
			case name == "datagrams_in":
				counter(descDatagrams, v, comp.Component, "in")
			case strings.HasPrefix(name, "drop_"):
				counter(descDrops, v, comp.Component, strings.TrimPrefix(name, "drop_"))
			default:
				counter(descEvents, v, comp.Component, name)
			}
		}
	}
	view, l := st.peering.view(), st.holder.current()
	backendOf := map[string]string{}
	peers := map[string]float64{}
	for _, p := range view {
		b := p.Backend
		if b == "" {
			b = "none"
		}
		backendOf[p.Name] = b
		peers[b]++
	}
	for b, n := range peers {
		ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, n, b)
	}
	type traffic struct{ txB, rxB, txF, rxF uint64 }
	byBackend := map[string]*traffic{}
	for _, p := range st.fw.peers.Peers() {
		b := backendOf[p.Name]
		if b == "" {
			b = "none"
		}
		tr := byBackend[b]
		if tr == nil {
			tr = &traffic{}
			byBackend[b] = tr
		}
		tr.txB += p.Stats.TxBytes.Load()
		tr.rxB += p.Stats.RxBytes.Load()
		tr.txF += p.Stats.TxFrames.Load()
		tr.rxF += p.Stats.RxFrames.Load()
	}
	for b, tr := range byBackend {
		counter(descPeerBytes, tr.txB, b, "tx")
		counter(descPeerBytes, tr.rxB, b, "rx")
		counter(descPeerFrames, tr.txF, b, "tx")
		counter(descPeerFrames, tr.rxF, b, "rx")
	}
	ch <- prometheus.MustNewConstMetric(descExpiry, prometheus.GaugeValue, float64(l.Expiration.UnixNano())/1e9)
	counter(descRenewals, st.holder.renewOK.Load(), "ok")
	counter(descRenewals, st.holder.renewErr.Load(), "error")
	counter(descSnapshots, st.peering.snapshots.Load())
	ch <- prometheus.MustNewConstMetric(descMTU, prometheus.GaugeValue, float64(st.fw.router.MTU()))
	for _, b := range []struct {
		dir string
		h   *tunnel.BatchHistogram
	}{{"tx", &st.fw.ctr.TxBatch}, {"rx", &st.fw.ctr.RxBatch}} {
		bounds, counts, sum := b.h.Snapshot()
		cum := map[float64]uint64{}
		var total uint64
		for i, ub := range bounds {
			total += counts[i]
			cum[ub] = total
		}
		ch <- prometheus.MustNewConstHistogram(descBatch, total, float64(sum), cum, b.dir)
	}
}
