//! The generated skeletons (one per program group, so one group failing to load or verify
//! leaves the others running) and [`Pinned`], which owns a loaded skeleton with its storage.

use std::mem::{ManuallyDrop, MaybeUninit};
use std::ptr::NonNull;

use libbpf_rs::OpenObject;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};

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

/// A loaded, attached skeleton together with the storage it borrows.
///
/// libbpf-rs skeletons borrow a caller-provided `MaybeUninit<OpenObject>` for their whole
/// life. To keep one in a struct, the storage is put on the heap here and the skeleton is
/// given a `'static` borrow of it; the skeleton is always dropped before the storage is freed.
pub(crate) struct Pinned<S> {
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

impl<S> Drop for Pinned<S> {
    fn drop(&mut self) {
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
/// loads it into the kernel and attaches its programs.
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
        let mut skel = open.load().map_err(|e| ("load", e))?;
        skel.attach().map_err(|e| ("attach", e))?;
        Ok(skel)
    })();
    match result {
        Ok(skel) => Ok(Pinned {
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
