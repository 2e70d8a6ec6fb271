//! Capabilities, CNI_ARGS, config reload and DEL from the kept state.

use super::*;
use crate::testing::daemon::Root;
use std::os::unix::fs::PermissionsExt;

#[test]
fn capabilities_follow_the_request_and_annotations() {
    let req = NetworkRequest {
        port_mappings: vec![
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "127.0.0.1".into(),
            },
            // No host port: nothing to publish.
            PortMapping {
                host_port: 0,
                container_port: 53,
                protocol: "udp".into(),
                host_ip: String::new(),
            },
        ],
        dns: Some(k8s_cri::v1::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
    };
    let annotations = BTreeMap::from([
        (INGRESS_BANDWIDTH.to_string(), "10M".to_string()),
        ("other".to_string(), "x".to_string()),
    ]);
    let caps = capabilities(&req, &annotations, "10.244.0.0/16").unwrap();
    assert_eq!(
        Value::Object(caps),
        json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}],
            "dns": {"servers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"], "options": ["ndots:5"]},
            "ipRanges": [[{"subnet": "10.244.0.0/16"}]],
            "bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 4_294_967_295u64},
        })
    );
    let none = capabilities(&NetworkRequest::default(), &BTreeMap::new(), "").unwrap();
    assert_eq!(Value::Object(none), json!({"portMappings": []}));
    let bad = BTreeMap::from([(EGRESS_BANDWIDTH.to_string(), "fast".to_string())]);
    let e = capabilities(&NetworkRequest::default(), &bad, "").unwrap_err();
    assert!(matches!(e, NetworkError::Invalid(_)), "{e}");
}

#[test]
fn bandwidth_quantities_are_read_as_kubelet_does() {
    assert_eq!(bandwidth("1k"), Ok(1_000));
    assert_eq!(bandwidth("10M"), Ok(10_000_000));
    assert_eq!(bandwidth("1.5M"), Ok(1_500_000));
    assert_eq!(bandwidth("1Mi"), Ok(1 << 20));
    assert_eq!(bandwidth("100000"), Ok(100_000));
    assert_eq!(bandwidth("1P"), Ok(1_000_000_000_000_000));
    assert_eq!(bandwidth("1000.5"), Ok(1001));
    assert!(bandwidth("999").unwrap_err().contains("small"));
    assert!(bandwidth("2P").unwrap_err().contains("large"));
    for bad in [
        "",
        "M",
        "1X",
        "-1M",
        "1e6",
        "1.2.3k",
        "99999999999999999999999999999999999",
    ] {
        assert!(bandwidth(bad).is_err(), "{bad}");
    }
}

#[test]
fn cni_args_name_the_pod_and_refuse_delimiters() {
    let mut rec = crate::store::tests::record("sandbox1");
    let args = cni_args(&rec).unwrap();
    let joined: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(
        joined.join(";"),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=n;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=sandbox1;K8S_POD_UID=u"
    );
    rec.meta.name = "p;K8S_POD_NAMESPACE=kube-system".into();
    assert!(matches!(cni_args(&rec), Err(NetworkError::Invalid(_))));
}

#[test]
fn the_first_ip_is_ipv4() {
    let ip = |a: &str| IpConfig {
        address: a.parse().unwrap(),
        gateway: None,
        interface: None,
    };
    let n = PodNetwork {
        netns: "/x".into(),
        interfaces: vec![],
        ips: vec![ip("fd00::5/64"), ip("10.0.0.5/24"), ip("10.0.1.5/24")],
        routes: vec![],
        dns: Dns::default(),
    };
    let ips: Vec<String> = n.pod_ips().iter().map(ToString::to_string).collect();
    assert_eq!(ips, ["10.0.0.5", "fd00::5", "10.0.1.5"]);
    // The record form is plain CIDR strings.
    let v = serde_json::to_value(&n).unwrap();
    assert_eq!(v["ips"][0]["address"], "fd00::5/64");
    assert_eq!(serde_json::from_value::<PodNetwork>(v).unwrap(), n);
}

/// A Network over `root`, configs in `conf`, plugins in `bin`.
fn network(root: &Root, conf: &Path, bin: &Path) -> Network {
    let mut config = Config::load(None).unwrap();
    config.root = root.path().to_path_buf();
    config.cni.conf_dir = conf.to_path_buf();
    config.cni.bin_dirs = vec![bin.to_path_buf()];
    config.cni.plugin_timeout_secs = 5;
    Network::new(&config).unwrap()
}

fn plugin(bin: &Path, name: &str, body: &str) {
    let p = bin.join(name);
    std::fs::write(&p, format!("#!/bin/sh\ninput=$(cat)\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn conflist(name: &str, plugin: &str) -> String {
    format!(r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[{{"type":"{plugin}"}}]}}"#)
}

#[test]
fn readiness_follows_the_conf_dir() {
    let root = Root::new();
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let net = network(&root, conf.path(), bin.path());
    let (reason, msg) = net.ready().unwrap_err();
    assert_eq!(reason, "NetworkPluginNotReady");
    assert!(msg.contains("no network config found"), "{msg}");

    std::fs::write(conf.path().join("10-a.conflist"), conflist("a", "fake")).unwrap();
    let msg = net.ready().unwrap_err().1;
    assert!(msg.contains("plugin binaries fake not found"), "{msg}");
    plugin(bin.path(), "fake", "true");
    net.ready().unwrap();
    assert_eq!(net.current().unwrap().name, "a");

    // A file sorting first takes over; so does an edit in place.
    std::fs::write(conf.path().join("05-b.conflist"), conflist("b", "fake")).unwrap();
    assert_eq!(net.current().unwrap().name, "b");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(conf.path().join("05-b.conflist"), conflist("b2", "fake")).unwrap();
    assert_eq!(net.current().unwrap().name, "b2");
    std::fs::write(conf.path().join("05-b.conflist"), "{broken").unwrap();
    assert_eq!(net.current().unwrap().name, "a");
    std::fs::remove_file(conf.path().join("10-a.conflist")).unwrap();
    let msg = net.ready().unwrap_err().1;
    assert!(msg.contains("05-b.conflist: invalid JSON"), "{msg}");

    let mut config = Config::load(None).unwrap();
    config.root = root.path().to_path_buf();
    config.cni.enabled = false;
    let off = Network::new(&config).unwrap();
    assert_eq!(off.ready().unwrap_err().0, "NetworkDisabled");
}

#[tokio::test]
async fn del_uses_the_kept_config_after_the_conf_dir_changed() {
    let root = Root::new();
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    let result =
        r#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.9.7/24","gateway":"10.244.9.1"}]}"#;
    plugin(
        bin.path(),
        "old",
        &format!(
            "echo \"$CNI_COMMAND old netns=$CNI_NETNS $(printf '%s' \"$input\" | jq -c .prevResult.ips)\" >> {}\n[ \"$CNI_COMMAND\" = ADD ] && echo '{result}'; true",
            log.display()
        ),
    );
    plugin(
        bin.path(),
        "new",
        &format!("echo \"$CNI_COMMAND new\" >> {}", log.display()),
    );
    std::fs::write(conf.path().join("10.conflist"), conflist("oldnet", "old")).unwrap();
    let net = network(&root, conf.path(), bin.path());
    let dir = tempfile::tempdir().unwrap();
    let mut rec = crate::store::tests::record("sb1");
    rec.dir = dir.path().to_path_buf();
    let list = net.current().unwrap();
    let pod = net
        .add(
            &rec,
            Path::new("/nonexistent/ns"),
            list,
            &NetworkRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(pod.pod_ips(), ["10.244.9.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(pod.ips[0].gateway, Some("10.244.9.1".parse().unwrap()));

    std::fs::write(conf.path().join("10.conflist"), conflist("newnet", "new")).unwrap();
    assert_eq!(net.current().unwrap().name, "newnet");
    net.teardown(&rec).await.unwrap();
    // Once done, DEL is not run again.
    net.teardown(&rec).await.unwrap();
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            "ADD old netns=/nonexistent/ns null",
            // The namespace is gone: an empty CNI_NETNS, and the result.
            r#"DEL old netns= [{"address":"10.244.9.7/24","gateway":"10.244.9.1"}]"#,
        ]
    );
}

#[tokio::test]
async fn a_failed_add_is_undone_and_reports_the_plugin() {
    let root = Root::new();
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    plugin(
        bin.path(),
        "ipam",
        &format!(
            "echo \"$CNI_COMMAND ipam\" >> {}\n[ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.244.9.8/24\"}}]}}'; true",
            log.display()
        ),
    );
    plugin(
        bin.path(),
        "broken",
        &format!(
            "echo \"$CNI_COMMAND broken\" >> {}\n[ \"$CNI_COMMAND\" = ADD ] && {{ echo '{{\"code\":7,\"msg\":\"bad config\"}}'; exit 1; }}; true",
            log.display()
        ),
    );
    std::fs::write(
        conf.path().join("10.conflist"),
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ipam"},{"type":"broken"}]}"#,
    )
    .unwrap();
    let net = network(&root, conf.path(), bin.path());
    let dir = tempfile::tempdir().unwrap();
    let mut rec = crate::store::tests::record("sb2");
    rec.dir = dir.path().to_path_buf();
    let e = net
        .add(
            &rec,
            Path::new("/ns"),
            net.current().unwrap(),
            &NetworkRequest::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "CNI plugin broken ADD failed: bad config (code 7)"
    );
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        ["ADD ipam", "ADD broken", "DEL broken", "DEL ipam"]
    );
    assert!(!cni::attachment_path(dir.path()).exists());
}

#[test]
fn namespaces_of_pods_that_are_gone_are_removed() {
    let root = Root::new();
    let conf = tempfile::tempdir().unwrap();
    let net = network(&root, conf.path(), conf.path());
    let (kept, gone) = (net.netns_path("kept"), net.netns_path("gone"));
    netns::create(&kept).unwrap();
    netns::create(&gone).unwrap();
    net.remove_orphans(&HashSet::from(["kept".to_string()]));
    assert!(netns::is_netns(&kept));
    assert!(!gone.exists());
    net.remove_netns(&kept).unwrap();
    assert!(!kept.exists());
}
