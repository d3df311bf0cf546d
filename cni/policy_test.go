package cni

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/tulle-net/tulle/internal/api"
)

// TestAttachPolicy: ADD tells tulled the pod and its addresses and waits
// for its answer; a refusal fails ADD (the runtime retries); no tulled at
// all lets ADD go on (tulled's table keeps an unknown address cut off);
// outside Kubernetes nothing is sent.
func TestAttachPolicy(t *testing.T) {
	const k8s = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_UID=u1;K8S_POD_INFRA_CONTAINER_ID=c1"
	_, ipn, _ := net.ParseCIDR("100.64.1.7/24")
	ipn.IP = net.ParseIP("100.64.1.7")
	res := &current.Result{IPs: []*current.IPConfig{{Address: *ipn}}}
	for _, tc := range []struct {
		name   string
		args   string
		status int // 0: no tulled listening
		want   *types.Error
		sent   bool
	}{
		{"ready", k8s, http.StatusNoContent, nil, true},
		{"tulled refuses", k8s, http.StatusServiceUnavailable, &types.Error{Code: types.ErrTryAgainLater}, true},
		{"no tulled", k8s, 0, nil, false},
		{"not kubernetes", "", http.StatusServiceUnavailable, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var got *api.Attachment
			if tc.status != 0 {
				ln, err := net.Listen("unix", filepath.Join(dir, api.SocketName))
				if err != nil {
					t.Fatal(err)
				}
				srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					var a api.Attachment
					if r.URL.Path == api.AttachPath && json.NewDecoder(r.Body).Decode(&a) == nil {
						got = &a
					}
					w.WriteHeader(tc.status)
				})}
				go srv.Serve(ln)
				t.Cleanup(func() { srv.Close() })
			}
			err := attachPolicy(&NetConf{RunDir: dir}, &skel.CmdArgs{ContainerID: "c1", Args: tc.args}, res)
			var te *types.Error
			switch {
			case tc.want == nil && err != nil:
				t.Fatalf("ADD fails: %v", err)
			case tc.want != nil && (!errors.As(err, &te) || te.Code != tc.want.Code):
				t.Fatalf("ADD: %v, want CNI error code %d", err, tc.want.Code)
			}
			if (got != nil) != tc.sent {
				t.Fatalf("attachment sent: %v, want %v", got != nil, tc.sent)
			}
			if got != nil && (got.Namespace != "x" || got.Name != "a" || got.UID != "u1" || got.ContainerID != "c1" || len(got.IPs) != 1 || got.IPs[0] != netip.MustParseAddr("100.64.1.7")) {
				t.Errorf("attachment %+v", got)
			}
		})
	}
}
