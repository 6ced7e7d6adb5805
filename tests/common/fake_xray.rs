//! A fake Xray API for tests: Xray's StatsService messages and service name only, served by
//! tonic inside a test namespace. No real Xray binary is available on this machine.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use super::Netns;

// Xray's app/stats/command messages, written here independently of the client's.

#[derive(Clone, PartialEq, prost::Message)]
struct GetStatsRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bool, tag = "2")]
    reset: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Stat {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    value: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryStatsRequest {
    #[prost(string, tag = "1")]
    pattern: String,
    #[prost(bool, tag = "2")]
    reset: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryStatsResponse {
    #[prost(message, repeated, tag = "1")]
    stat: Vec<Stat>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetStatsOnlineIpListResponse {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(map = "string, int64", tag = "2")]
    ips: HashMap<String, i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetAllOnlineUsersRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct GetAllOnlineUsersResponse {
    #[prost(string, repeated, tag = "1")]
    users: Vec<String>,
}

pub const ALICE_ONLINE: &str = "user>>>alice@example.com>>>online";

/// Who the fake says is online: the online map's name (`user>>>EMAIL>>>online`) and its IP keys
/// as Xray writes them.
pub type Online = HashMap<String, Vec<String>>;

/// The answer the Xray-only tests expect: alice on three addresses in Xray's three spellings.
pub fn alice_online() -> Online {
    HashMap::from([(
        ALICE_ONLINE.to_string(),
        vec![
            "[2001:db8::7]".into(),
            "::ffff:10.1.2.3".into(),
            "10.9.9.9".into(),
        ],
    )])
}

async fn query_stats(
    req: Request<QueryStatsRequest>,
) -> Result<Response<QueryStatsResponse>, Status> {
    let all = [
        ("inbound>>>api-in>>>traffic>>>uplink", 999),
        ("user>>>bob@example.com>>>traffic>>>uplink", 277),
        ("user>>>alice@example.com>>>traffic>>>downlink", 20001090),
        ("user>>>bob@example.com>>>traffic>>>downlink", 18733642),
        ("user>>>alice@example.com>>>traffic>>>uplink", 4064121),
    ];
    let pattern = req.into_inner().pattern;
    let stat = all
        .iter()
        .filter(|(n, _)| n.contains(&pattern))
        .map(|(n, v)| Stat {
            name: n.to_string(),
            value: *v,
        })
        .collect();
    Ok(Response::new(QueryStatsResponse { stat }))
}

async fn online_ip_list(
    online: Arc<Online>,
    req: Request<GetStatsRequest>,
) -> Result<Response<GetStatsOnlineIpListResponse>, Status> {
    let name = req.into_inner().name;
    let Some(keys) = online.get(&name) else {
        return Err(Status::not_found(format!("online map {name} not found")));
    };
    let ips = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), 1_700_000_000 + i as i64))
        .collect();
    Ok(Response::new(GetStatsOnlineIpListResponse { name, ips }))
}

async fn all_online_users(
    _: Request<GetAllOnlineUsersRequest>,
) -> Result<Response<GetAllOnlineUsersResponse>, Status> {
    Ok(Response::new(GetAllOnlineUsersResponse {
        users: vec![
            "user>>>bob@example.com>>>online".into(),
            ALICE_ONLINE.into(),
        ],
    }))
}

/// Xray's StatsService under its own name only, dispatching on the request path as a generated
/// server does. Every path asked for is recorded.
#[derive(Clone, Default)]
struct XrayStats {
    paths: Arc<Mutex<Vec<String>>>,
    online: Arc<Online>,
}

impl NamedService for XrayStats {
    const NAME: &'static str = "xray.app.stats.command.StatsService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl tower::Service<http::Request<Body>> for XrayStats {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        self.paths.lock().unwrap().push(path.clone());
        let refuse = |message: String| -> Self::Future {
            Box::pin(async move { Ok(Status::unimplemented(message).into_http()) })
        };
        // Go's gRPC server words these two refusals this way.
        let Some(method) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(Self::NAME))
            .and_then(|p| p.strip_prefix('/'))
        else {
            let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
            return refuse(format!("unknown service {service}"));
        };
        match method {
            "QueryStats" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                    QueryStatsResponse,
                    QueryStatsRequest,
                >::default());
                Ok(grpc.unary(tower::service_fn(query_stats), req).await)
            }),
            "GetStatsOnlineIpList" => Box::pin({
                let online = self.online.clone();
                async move {
                    let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                        GetStatsOnlineIpListResponse,
                        GetStatsRequest,
                    >::default());
                    Ok(grpc
                        .unary(
                            tower::service_fn(move |r| online_ip_list(online.clone(), r)),
                            req,
                        )
                        .await)
                }
            }),
            "GetAllOnlineUsers" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                    GetAllOnlineUsersResponse,
                    GetAllOnlineUsersRequest,
                >::default());
                Ok(grpc.unary(tower::service_fn(all_online_users), req).await)
            }),
            other => refuse(format!("unknown method {other} for service {}", Self::NAME)),
        }
    }
}

/// The fake Xray API served on `bind` inside `ns` until dropped.
pub struct FakeXray {
    pub addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeXray {
    pub fn start(ns: &Netns, bind: SocketAddr, online: Online) -> FakeXray {
        let svc = XrayStats {
            online: Arc::new(online),
            ..Default::default()
        };
        let paths = svc.paths.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(bind).expect("bind in the namespace");
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .serve_with_incoming_shutdown(
                        svc,
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(5)).expect("server up");
        FakeXray {
            addr,
            paths,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

impl Drop for FakeXray {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
