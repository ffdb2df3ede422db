import { defineConfig } from "vite";

// Fixed file names: the gateway embeds ui/dist by name (src/gateway/ui.rs)
// and serves it with an ETag instead of hashed names.
export default defineConfig({
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    modulePreload: { polyfill: false },
    rollupOptions: {
      output: {
        entryFileNames: "assets/app.js",
        chunkFileNames: "assets/[name].js",
        assetFileNames: "assets/app[extname]",
      },
    },
  },
});
