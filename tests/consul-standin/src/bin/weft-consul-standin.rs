//! Runs the Consul stand-in as a process: `weft-consul-standin --listen ADDR [--token T]
//! [--datacenter DC]`. For manual testing and for tests that need Consul in another process;
//! it is not a Consul server (see the library's docs for what it covers).

use std::net::SocketAddr;

use weft_consul_standin::{ConsulStandIn, StandInOptions};

fn usage() -> ! {
    eprintln!("usage: weft-consul-standin --listen ADDR [--token TOKEN] [--datacenter DC]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8500));
    let mut options = StandInOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage()),
            "--token" => options.token = Some(value),
            "--datacenter" => options.datacenter = value,
            _ => usage(),
        }
    }
    let standin = match ConsulStandIn::start_with(listen, options).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weft-consul-standin: cannot listen on {listen}: {e}");
            std::process::exit(1)
        }
    };
    println!("weft-consul-standin listening on {}", standin.url());
    let _ = tokio::signal::ctrl_c().await;
    drop(standin);
}
