//! The generated skeletons (one per program group, so one group failing to load or verify
//! leaves the others running) and [`Pinned`], which owns a loaded skeleton with its storage.

use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::NonNull;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, OpenObject};

macro_rules! skeleton {
    ($name:ident, $file:literal) => {
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::unwrap_used,
            clippy::expect_used,
            unsafe_op_in_unsafe_fn,
            missing_debug_implementations,
            missing_docs,
            unused_imports,
            unreachable_pub,
            dead_code
        )]
        pub(crate) mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

skeleton!(tcp, "tcp.skel.rs");
skeleton!(sched, "sched.skel.rs");
skeleton!(oom, "oom.skel.rs");
skeleton!(proc, "proc.skel.rs");
skeleton!(block, "block.skel.rs");
skeleton!(floor, "floor.skel.rs");

/// A loaded skeleton together with the storage it borrows and the links attaching its
/// programs.
///
/// libbpf-rs skeletons borrow a caller-provided `MaybeUninit<OpenObject>` for their whole
/// life. To keep one in a struct, the storage is put on the heap here and the skeleton is
/// given a `'static` borrow of it; the skeleton is always dropped before the storage is freed.
///
/// The programs are attached here, one link per loaded program, rather than by the
/// skeleton's own `attach()`: the skeleton keeps raw link pointers that a detach would leave
/// dangling, so it could not attach again. Owning the links makes detach (drop them) and
/// re-attach (attach each loaded program anew) safe while the maps keep their contents.
pub(crate) struct Pinned<S> {
    links: Vec<Link>,
    skel: ManuallyDrop<S>,
    storage: NonNull<MaybeUninit<OpenObject>>,
}

// SAFETY: the storage is owned by this value alone and only reached through the skeleton; the
// generated skeletons are `Send` (libbpf objects may be used from any thread, one at a time).
unsafe impl<S: Send> Send for Pinned<S> {}

impl<S> Pinned<S> {
    pub(crate) fn get(&self) -> &S {
        &self.skel
    }
}

impl<'obj, S: Skel<'obj>> Pinned<S> {
    /// Whether the programs are attached.
    pub(crate) fn is_attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Detaches every program (the maps and their contents stay).
    pub(crate) fn detach(&mut self) {
        self.links.clear();
    }

    /// Attaches every loaded program; nothing when already attached. On failure nothing is
    /// left attached.
    pub(crate) fn attach(&mut self) -> libbpf_rs::Result<()> {
        if self.links.is_empty() {
            self.links = attach_loaded(self.skel.object())?;
        }
        Ok(())
    }
}

/// One link per loaded program (the others were left out by `set_autoload(false)`).
fn attach_loaded(object: &libbpf_rs::Object) -> libbpf_rs::Result<Vec<Link>> {
    object
        .progs_mut()
        .filter(|prog| prog.autoload())
        .map(|prog| prog.attach())
        .collect()
}

impl<S> Drop for Pinned<S> {
    fn drop(&mut self) {
        // Detach before the programs and maps go away.
        self.links.clear();
        // SAFETY: the skeleton is dropped exactly once, here, and not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.skel) };
        // SAFETY: `storage` came from a leaked `Box` in `open_load`, and its only user, the
        // skeleton (which dropped the object inside it), is gone.
        drop(unsafe { Box::from_raw(self.storage.as_ptr()) });
    }
}

impl<S> std::fmt::Debug for Pinned<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").finish_non_exhaustive()
    }
}

/// Opens the skeleton, lets `configure` adjust it (constants, map sizes, which programs load),
/// loads it into the kernel and attaches its loaded programs.
pub(crate) fn open_load<B, F>(
    builder: B,
    configure: F,
) -> Result<Pinned<<B::Output as OpenSkel<'static>>::Output>, (&'static str, libbpf_rs::Error)>
where
    B: SkelBuilder<'static>,
    F: FnOnce(&mut B::Output) -> libbpf_rs::Result<()>,
{
    // A heap slot with a stable address; freed by `Pinned::drop` or the error path below.
    let storage = NonNull::from(Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit())));
    // SAFETY: the slot was just allocated and nothing else refers to it; this borrow is handed
    // to the skeleton, its only user until the slot is freed after the skeleton is gone.
    let object: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *storage.as_ptr() };
    let result = (|| {
        let mut open = builder.open(object).map_err(|e| ("open", e))?;
        configure(&mut open).map_err(|e| ("configure", e))?;
        let skel = open.load().map_err(|e| ("load", e))?;
        let links = attach_loaded(skel.object()).map_err(|e| ("attach", e))?;
        Ok((skel, links))
    })();
    match result {
        Ok((skel, links)) => Ok(Pinned {
            links,
            skel: ManuallyDrop::new(skel),
            storage,
        }),
        Err(e) => {
            // SAFETY: the failed open/load/attach dropped whatever it had put in the storage
            // (the generated skeletons drop their object in place), and nothing refers to it.
            drop(unsafe { Box::from_raw(storage.as_ptr()) });
            Err(e)
        }
    }
}
