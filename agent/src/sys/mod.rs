//! The agent's contact with the operating system that is not Docker: running host tools
//! (iptables, nft, tc) — optionally inside another network namespace — and identifying network
//! namespaces. Everything that spawns a process goes through [`command`].

pub mod command;
pub mod netns;
