package kube

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	coordv1 "k8s.io/api/coordination/v1"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tulle-net/tulle/lease"
)

func TestAttrsRoundTrip(t *testing.T) {
	a := lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.1"), PublicIPv6: netip.MustParseAddr("fd00:198::1"),
		Backend: lease.Backend{Type: "udp", Port: 8285}, Backends: map[string]json.RawMessage{"udp": json.RawMessage(`{"port":8285}`), "host-gw": json.RawMessage(`{}`)}}
	got, err := decodeAttrs(encodeAttrs(a))
	if err != nil || got.PublicIP != a.PublicIP || got.PublicIPv6 != a.PublicIPv6 || got.Backend.Type != "udp" || got.Backend.Port != 8285 ||
		string(got.Backends["udp"]) != `{"port":8285}` || string(got.Backends["host-gw"]) != `{}` {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	good := encodeAttrs(a)
	tests := []struct {
		name string
		edit func(map[string]string)
		want string
	}{
		{"no backend", func(m map[string]string) { delete(m, AnnBackendType) }, "no tulle.dev/backend-type"},
		{"unknown backend", func(m map[string]string) { m[AnnBackendType] = "ipip" }, "unknown backend"},
		{"bad json", func(m map[string]string) { m[AnnBackendData] = "{" }, "malformed tulle.dev/backend-data"},
		{"no port", func(m map[string]string) { m[AnnBackendData] = "{}" }, "no port"},
		{"v6 as v4", func(m map[string]string) { m[AnnPublicIP] = "fd00::1" }, "malformed tulle.dev/public-ip"},
		{"no address", func(m map[string]string) { delete(m, AnnPublicIP); delete(m, AnnPublicIPv6) }, "no public address"},
		{"bad capabilities", func(m map[string]string) { m[AnnBackends] = `["udp"]` }, "malformed tulle.dev/backends"},
	}
	for _, tt := range tests {
		m := map[string]string{}
		for k, v := range good {
			m[k] = v
		}
		tt.edit(m)
		if _, err := decodeAttrs(m); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
}

func TestLeaseNames(t *testing.T) {
	for p, want := range map[string]string{
		"100.96.3.0/24":    "tulle-100-96-3-0-24",
		"fd00:96:0:3::/64": "tulle-fd00-96-0-3---64",
		"100.127.255.0/24": "tulle-100-127-255-0-24",
	} {
		if got := leaseName(netip.MustParsePrefix(p)); got != want {
			t.Errorf("leaseName(%s) = %s, want %s", p, got, want)
		}
	}
}

func TestSlimNodeKeepsOnlyWhatTulleReads(t *testing.T) {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n", ResourceVersion: "7", Labels: map[string]string{"a": "b"},
			Annotations:   map[string]string{AnnPublicIP: "198.18.0.1", "other": strings.Repeat("x", 1000)},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec:   corev1.NodeSpec{PodCIDRs: []string{"100.96.1.0/24"}, ProviderID: "p"},
		Status: corev1.NodeStatus{Images: []corev1.ContainerImage{{Names: []string{"img"}}}},
	}
	o, _ := slimNode(n)
	s := o.(*corev1.Node)
	if s.Name != "n" || s.ResourceVersion != "7" || s.Annotations[AnnPublicIP] != "198.18.0.1" || len(s.Spec.PodCIDRs) != 1 {
		t.Errorf("lost what tulle reads: %+v", s)
	}
	if len(s.Annotations) != 1 || s.Labels != nil || s.ManagedFields != nil || s.Status.Images != nil || s.Spec.ProviderID != "" {
		t.Errorf("kept what tulle does not read: %+v", s)
	}
}

func TestNewValidates(t *testing.T) {
	nc := netConf(t, `{"Network":"100.96.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:96::/60","IPv6SubnetLen":64}`)
	c := fake.NewClientset()
	if _, err := New(Options{Client: c, Net: nc, Mode: "bogus"}); err == nil {
		t.Error("unknown mode accepted")
	}
	if _, err := New(Options{Client: c, Net: nc, Mode: ModeLease}); err == nil {
		t.Error("lease mode without namespace accepted")
	}
	// 255 IPv4 subnets but only 16 IPv6 ones: cannot pair them.
	if _, err := New(Options{Client: c, Net: nc, Mode: ModeLease, Namespace: "x"}); err == nil {
		t.Error("lease mode with too few IPv6 subnets accepted")
	}
	if _, err := New(Options{Client: c, Net: nc}); err != nil {
		t.Errorf("podcidr mode: %v", err)
	}
}

// TestLeaseExpiryByObservation: a Lease's expiry is judged by when this
// node saw its renewal, so holders with skewed clocks neither lose their
// subnet while they renew nor keep it after they stop.
func TestLeaseExpiryByObservation(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	r := renewals{now: func() time.Time { return now }, seen: map[string]sighting{}}
	secs := int32(60)
	obj := func(name, holder string, renew time.Time) *coordv1.Lease {
		rt := metav1.NewMicroTime(renew)
		return &coordv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: coordv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &rt, LeaseDurationSeconds: &secs}}
	}
	tests := []struct {
		name   string
		renew  time.Time // by the holder's clock
		offset time.Duration
	}{
		{"holder clock an hour behind", now.Add(-time.Hour), 0},
		{"holder clock an hour ahead", now.Add(time.Hour), 0},
		{"holder clock right", now, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name := "tulle-" + tt.name
			o := obj(name, "n1", tt.renew)
			if exp := r.expiry(o); !exp.Equal(now.Add(time.Minute)) {
				t.Fatalf("first sighting: expiry %v, want %v (a duration from now)", exp, now.Add(time.Minute))
			}
			now = now.Add(50 * time.Second)
			if exp := r.expiry(o); !exp.After(now) {
				t.Fatal("expired 50 s after the sighting of a 60 s lease")
			}
			// A renewal (the renew time moves on, whatever it says) is seen
			// now and restarts the duration.
			o = obj(name, "n1", tt.renew.Add(20*time.Second))
			if exp := r.expiry(o); !exp.Equal(now.Add(time.Minute)) {
				t.Fatalf("after a renewal: expiry %v, want %v", exp, now.Add(time.Minute))
			}
			now = now.Add(61 * time.Second)
			if exp := r.expiry(o); exp.After(now) {
				t.Fatal("not expired 61 s after the last sighting of a renewal")
			}
			// A new holder is a new sighting.
			if exp := r.expiry(obj(name, "n2", tt.renew.Add(20*time.Second))); !exp.After(now) {
				t.Fatal("a takeover by another holder was not seen as fresh")
			}
		})
	}
	r.retain(map[string]bool{})
	if len(r.seen) != 0 {
		t.Errorf("retain kept %d sightings of deleted Leases", len(r.seen))
	}
}
