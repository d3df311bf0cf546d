package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/kubetest"
)

// kustomization is the part of deploy/kustomization.yaml the base uses.
type kustomization struct {
	Namespace          string   `json:"namespace"`
	Resources          []string `json:"resources"`
	ConfigMapGenerator []struct {
		Name  string   `json:"name"`
		Files []string `json:"files"`
	} `json:"configMapGenerator"`
}

// render builds what `kubectl apply -k deploy/` sends: the resources, the
// generated ConfigMap, every namespaced object in the namespace.
func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization // images and generatorOptions need no rendering here
	if err := yaml.Unmarshal(raw, &k); err != nil {
		t.Fatal(err)
	}
	var objs []*unstructured.Unstructured
	for _, r := range k.Resources {
		b, err := os.ReadFile(filepath.Join(dir, r))
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range bytes.Split(b, []byte("\n---")) {
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			j, err := yaml.YAMLToJSON(doc)
			if err != nil {
				t.Fatalf("%s: %v", r, err)
			}
			if string(j) == "null" {
				continue
			}
			u := &unstructured.Unstructured{}
			if err := u.UnmarshalJSON(j); err != nil {
				t.Fatalf("%s: %v", r, err)
			}
			objs = append(objs, u)
		}
	}
	for _, g := range k.ConfigMapGenerator {
		data := map[string]any{}
		for _, f := range g.Files {
			b, err := os.ReadFile(filepath.Join(dir, f))
			if err != nil {
				t.Fatal(err)
			}
			data[filepath.Base(f)] = string(b)
		}
		objs = append(objs, &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "ConfigMap",
			"metadata": map[string]any{"name": g.Name}, "data": data}})
	}
	return objs
}

// TestDeployManifests: the API server accepts every object of the
// Kustomize base (server-side apply, dry run), the DaemonSet has the shape
// operators rely on, and the ConfigMap's net-conf.json and conflist parse.
func TestDeployManifests(t *testing.T) {
	needAPI(t)
	ctx := context.Background()
	dir := filepath.Join("..", "..", "deploy")
	objs := render(t, dir)
	cfg := kc.Config(kubetest.AdminToken)
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	groups, err := restmapper.GetAPIGroupResources(dc)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// A dry run creates nothing, so the namespace the other objects go in
	// must exist (as after the first, real apply).
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "tulle-system"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s %s: %v", gvk.Kind, o.GetName(), err)
		}
		ri := dyn.Resource(m.Resource)
		var res dynamic.ResourceInterface = ri
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			o.SetNamespace("tulle-system")
			res = ri.Namespace("tulle-system")
		}
		body, _ := json.Marshal(o.Object)
		force := true
		if _, err := res.Patch(ctx, o.GetName(), types.ApplyPatchType, body, metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}, FieldManager: "tulle-test", Force: &force}); err != nil {
			t.Errorf("the API server refuses %s %s: %v", gvk.Kind, o.GetName(), err)
		}
		kinds[gvk.Kind]++
		switch gvk.Kind {
		case "DaemonSet":
			var ds appsv1.DaemonSet
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
				t.Fatal(err)
			}
			checkDaemonSet(t, &ds)
		case "ConfigMap":
			data, _, _ := unstructured.NestedStringMap(o.Object, "data")
			if _, err := netconf.Parse([]byte(data["net-conf.json"])); err != nil {
				t.Errorf("ConfigMap net-conf.json: %v", err)
			}
			if _, err := libcni.ConfListFromBytes([]byte(data["10-tulle.conflist"])); err != nil {
				t.Errorf("ConfigMap conflist: %v", err)
			}
		}
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "DaemonSet", "ConfigMap"} {
		if kinds[k] != 1 {
			t.Errorf("%d %s objects, want 1", kinds[k], k)
		}
	}
}

func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet) {
	t.Helper()
	p := ds.Spec.Template.Spec
	if !p.HostNetwork || p.PriorityClassName != "system-node-critical" || p.ServiceAccountName != "tulle" {
		t.Errorf("pod spec: hostNetwork %v, priority %q, service account %q", p.HostNetwork, p.PriorityClassName, p.ServiceAccountName)
	}
	if p.AutomountServiceAccountToken != nil && !*p.AutomountServiceAccountToken {
		t.Error("the DaemonSet does not mount its pod-bound token: node-identity.yaml refuses any other")
	}
	if !slices.ContainsFunc(p.Tolerations, func(tl corev1.Toleration) bool { return tl.Operator == "Exists" && tl.Key == "" }) {
		t.Error("the DaemonSet does not tolerate every taint")
	}
	if len(p.Containers) != 1 || len(p.InitContainers) != 1 {
		t.Fatalf("%d containers, %d init containers", len(p.Containers), len(p.InitContainers))
	}
	c := p.Containers[0]
	sc := c.SecurityContext
	if sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.Capabilities == nil {
		t.Fatal("tulled must run unprivileged with capabilities")
	}
	caps := []string{}
	for _, c := range sc.Capabilities.Add {
		caps = append(caps, string(c))
	}
	slices.Sort(caps)
	if strings.Join(caps, ",") != "NET_ADMIN,NET_RAW" {
		t.Errorf("capabilities %v, want NET_ADMIN and NET_RAW", caps)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" ||
		c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Error("probes must be /healthz (liveness) and /readyz (readiness)")
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Error("no resource requests")
	}
	if !slices.Contains(p.InitContainers[0].Command, "install-cni") {
		t.Errorf("init container %v does not install the CNI plugin", p.InitContainers[0].Command)
	}
	hasTun := false
	for _, v := range p.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/dev/net/tun" {
			hasTun = true
		}
	}
	if !hasTun {
		t.Error("no /dev/net/tun")
	}
}
