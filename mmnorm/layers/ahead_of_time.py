"""The fused kernels compiled ahead of time, without a GPU
(tools/compile_kernels.py): every variant of every kernels module, for the
NVIDIA architectures asked for."""
import os

# the kernels modules, mmnorm.layers.<name>.kernels
KERNEL_MODULES = ('shared', 'mabn', 'brn', 'cbn')


def kernel_modules():
    """name -> the Triton kernels module ``mmnorm.layers.<name>.kernels`` of
    each of ``KERNEL_MODULES``, imported now: Triton reads ``TRITON_INTERPRET``
    when the kernels are defined."""
    from .brn import kernels as brn
    from .cbn import kernels as cbn
    from .mabn import kernels as mabn
    from .shared import kernels as shared
    return {'shared': shared, 'mabn': mabn, 'brn': brn, 'cbn': cbn}


def compile_ahead_of_time(archs):
    """Compile every kernel variant of the fused kernels for the NVIDIA compute
    capabilities ``archs`` (e.g. (80, 90)) without a GPU, as Triton would on
    one; raises at the first one that does not compile. Returns one (kernel
    name, arch, cubin bytes) per variant and arch."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        raise RuntimeError('TRITON_INTERPRET=1 defines the kernels for the interpreter, which '
                           'compiles nothing: unset it')
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    compiled = []
    modules = kernel_modules()
    for name in KERNEL_MODULES:
        for kernel, types, constants in modules[name].variants():
            for arch in archs:
                source = ASTSource(fn=kernel, signature=types, constexprs=constants)
                binary = triton.compile(source, target=GPUTarget('cuda', arch, 32))
                compiled.append((kernel.__name__, arch, len(binary.asm['cubin'])))
    return compiled
