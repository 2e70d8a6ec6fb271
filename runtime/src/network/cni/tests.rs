//! Plugin chains run against fake plugins: shell scripts in a temporary
//! bin dir that log their environment and input.

use super::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;

struct Bin(tempfile::TempDir);

impl Bin {
    fn new() -> Bin {
        Bin(tempfile::tempdir().unwrap())
    }

    fn dir(&self) -> &Path {
        self.0.path()
    }

    /// Plugin `name`: logs its call, keeps its stdin, then runs `body`.
    fn plugin(&self, name: &str, body: &str) {
        let d = self.dir().display();
        let script = format!(
            "#!/bin/sh\ninput=$(cat)\n\
             echo \"$CNI_COMMAND {name} netns=$CNI_NETNS ifname=$CNI_IFNAME cid=$CNI_CONTAINERID args=$CNI_ARGS path=$CNI_PATH stray=$CNI_STRAY\" >> {d}/calls\n\
             printf '%s' \"$input\" > {d}/stdin-{name}-$CNI_COMMAND\n{body}\n"
        );
        let p = self.dir().join(name);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn plugins(&self, timeout: Duration) -> Plugins {
        Plugins::new(
            vec![self.dir().join("absent"), self.dir().to_path_buf()],
            timeout,
        )
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn stdin(&self, name: &str, command: &str) -> Value {
        let p = self.dir().join(format!("stdin-{name}-{command}"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }
}

const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:f4:01:05","sandbox":"/ns"}],"ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":0}]}"#;

fn attachment(list: Value) -> Attachment {
    Attachment {
        list,
        container_id: "abc123".into(),
        netns: "/ns".into(),
        ifname: "eth0".into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "web".into()),
        ],
        capabilities: json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
            "dns": {"servers": ["10.96.0.10"]}
        })
        .as_object()
        .unwrap()
        .clone(),
        result: None,
    }
}

fn two_plugin_list() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "testnet",
        "plugins": [
            {"type": "first", "bridge": "cni0"},
            {"type": "second", "capabilities": {"portMappings": true, "bandwidth": true, "dns": false}}
        ]
    })
}

#[tokio::test]
async fn add_chains_results_and_gives_each_plugin_only_its_capabilities() {
    let bin = Bin::new();
    bin.plugin("first", &format!("echo '{RESULT}'"));
    // The second passes its prevResult on, as portmap does.
    bin.plugin("second", "printf '%s' \"$input\" | jq -c .prevResult");
    std::env::set_var("CNI_STRAY", "from-the-daemon");
    let a = attachment(two_plugin_list());
    let result = bin.plugins(Duration::from_secs(10)).add(&a).await.unwrap();
    assert_eq!(result, serde_json::from_str::<Value>(RESULT).unwrap());

    let first = bin.stdin("first", "ADD");
    assert_eq!(first["name"], "testnet");
    assert_eq!(first["cniVersion"], "1.0.0");
    assert_eq!(first["bridge"], "cni0");
    assert!(first.get("prevResult").is_none());
    assert!(first.get("runtimeConfig").is_none(), "{first}");
    let second = bin.stdin("second", "ADD");
    assert_eq!(second["prevResult"], result);
    // Declared and offered: portMappings; declared, not offered:
    // bandwidth; offered, declared false: dns.
    assert_eq!(
        second["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]})
    );
    let calls = bin.calls();
    let path = format!(
        "{}:{}",
        bin.dir().join("absent").display(),
        bin.dir().display()
    );
    assert_eq!(
        calls,
        [
            format!("ADD first netns=/ns ifname=eth0 cid=abc123 args=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web path={path} stray="),
            format!("ADD second netns=/ns ifname=eth0 cid=abc123 args=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web path={path} stray="),
        ]
    );
}

#[tokio::test]
async fn del_runs_in_reverse_with_the_cached_result_and_check_in_order() {
    let bin = Bin::new();
    bin.plugin("first", "true");
    bin.plugin("second", "true");
    let mut a = attachment(two_plugin_list());
    let plugins = bin.plugins(Duration::from_secs(10));
    // Before ADD finished: no prevResult, and nothing to CHECK.
    plugins.del(&a, false).await.unwrap();
    assert!(bin.stdin("second", "DEL").get("prevResult").is_none());
    plugins.check(&a).await.unwrap();
    a.result = Some(serde_json::from_str(RESULT).unwrap());
    plugins.del(&a, true).await.unwrap();
    plugins.check(&a).await.unwrap();
    let calls: Vec<String> = bin
        .calls()
        .iter()
        .map(|c| c.split(" ifname").next().unwrap().to_string())
        .collect();
    assert_eq!(
        calls,
        [
            "DEL second netns=",
            "DEL first netns=",
            "DEL second netns=/ns",
            "DEL first netns=/ns",
            "CHECK first netns=/ns",
            "CHECK second netns=/ns",
        ]
    );
    assert_eq!(
        bin.stdin("first", "DEL")["prevResult"],
        a.result.clone().unwrap()
    );
    assert_eq!(
        bin.stdin("second", "CHECK")["prevResult"],
        a.result.clone().unwrap()
    );
    // disableCheck turns CHECK off.
    let mut list = two_plugin_list();
    list["disableCheck"] = json!(true);
    a.list = list;
    plugins.check(&a).await.unwrap();
    assert_eq!(bin.calls().len(), 6);
}

#[tokio::test]
async fn plugin_failures_are_reported_with_their_message() {
    let bin = Bin::new();
    let one =
        |t: &str| attachment(json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": t}]}));
    let plugins = bin.plugins(Duration::from_secs(2));

    bin.plugin("errjson", r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"failed to allocate","details":"range is full"}'; exit 1"#);
    let e = plugins.add(&one("errjson")).await.unwrap_err();
    assert!(
        matches!(e, CniError::Plugin { ref error, .. } if error.code == 11),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "CNI plugin errjson ADD failed: failed to allocate (code 11): range is full"
    );

    bin.plugin("crash", "echo 'panic: oh no' >&2; exit 2");
    let e = plugins.add(&one("crash")).await.unwrap_err().to_string();
    assert!(
        e.contains("exit status: 2") && e.contains("panic: oh no"),
        "{e}"
    );

    bin.plugin("garbage", "echo 'this is not json'");
    let e = plugins.add(&one("garbage")).await.unwrap_err();
    assert!(matches!(e, CniError::Result { .. }), "{e:?}");
    assert!(e.to_string().contains("this is not json"), "{e}");

    bin.plugin(
        "badresult",
        r#"echo '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/99"}]}'"#,
    );
    let e = plugins
        .add(&one("badresult"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("prefix length"), "{e}");

    bin.plugin("huge", "head -c 3000000 /dev/zero");
    let e = plugins.add(&one("huge")).await.unwrap_err();
    assert!(
        matches!(
            e,
            CniError::TooLarge {
                stream: "stdout",
                ..
            }
        ),
        "{e:?}"
    );

    bin.plugin("hugeerr", "head -c 3000000 /dev/zero >&2; sleep 30");
    let t = std::time::Instant::now();
    let e = plugins.add(&one("hugeerr")).await.unwrap_err();
    assert!(
        matches!(
            e,
            CniError::TooLarge {
                stream: "stderr",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));

    bin.plugin("hang", "sleep 30");
    let t = std::time::Instant::now();
    let e = plugins.add(&one("hang")).await.unwrap_err();
    assert!(matches!(e, CniError::Timeout { secs: 2, .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));

    let e = plugins.add(&one("nowhere")).await.unwrap_err();
    assert!(matches!(e, CniError::NotFound { .. }), "{e:?}");
    assert_eq!(
        plugins.missing(&NetworkList::from_json(one("nowhere").list).unwrap()),
        ["nowhere"]
    );

    // A failing plugin stops the chain: the next one never runs.
    let a = attachment(
        json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "errjson"}, {"type": "garbage"}]}),
    );
    std::fs::remove_file(bin.dir().join("calls")).unwrap();
    plugins.add(&a).await.unwrap_err();
    assert_eq!(bin.calls().len(), 1);
}
