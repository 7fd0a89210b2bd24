{
  "targets": [
    {
      "target_name": "vrdma_native",
      "sources": [
        "src/addon.cc",
        "src/sys.cc",
        "src/verbs/args.cc",
        "src/verbs/completions.cc",
        "src/verbs/device.cc",
        "src/verbs/events.cc",
        "src/verbs/init.cc",
        "src/verbs/objects.cc",
        "src/verbs/registry.cc",
        "src/verbs/wr.cc",
        "src/verbs/mapped.cc",
        "src/verbs/doorbell.cc",
        "src/vfio-user/dma_fd.cc",
        "src/vfio-user/stall_timer.cc",
        "src/vfio-user/vfio_user.cc"
      ],
      "variables": {
        "vfio_user_prefix": "<!(bash ../scripts/vfio-user/libvfio-user.sh | tail -n 1)"
      },
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "<(vfio_user_prefix)/include"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-fno-exceptions"],
      "libraries": ["-libverbs", "-L<(vfio_user_prefix)/lib", "-lvfio-user", "-Wl,-rpath,<(vfio_user_prefix)/lib"]
    }
  ]
}
