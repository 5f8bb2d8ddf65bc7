// Calling the Rerank service from Node.js with nothing but the proto file.
//
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node examples/node/rerank.js localhost:50051
//
// Set RERANK_API_KEY to send `authorization: Bearer <key>` when the server requires keys.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("rerank/v1/rerank.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the proto: top_n, return_documents
  enums: String, // TRUNCATION_END rather than 1
  longs: Number, // uint64 token counts as plain numbers
  defaults: true,
});
const { rerank } = grpc.loadPackageDefinition(definition);

const target = process.argv[2] || "localhost:50051";
const client = new rerank.v1.RerankService(target, grpc.credentials.createInsecure());

const metadata = new grpc.Metadata();
if (process.env.RERANK_API_KEY) metadata.set("authorization", `Bearer ${process.env.RERANK_API_KEY}`);

const request = {
  query: "What is the capital of France?",
  documents: ["Bananas are yellow.", "Paris is the capital and largest city of France."],
  top_n: 0, // all
  return_documents: true,
  truncation: "TRUNCATION_END",
};
const deadline = new Date(Date.now() + 10_000);

client.Rerank(request, metadata, { deadline }, (err, response) => {
  if (err) {
    // err.code is the gRPC status number, err.details the server's message;
    // on RESOURCE_EXHAUSTED, err.metadata.get("retry-after-ms") says when to retry
    console.error(`${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  }
  for (const r of response.results) {
    console.log(`${r.score.toFixed(4)}  [${r.index}]  ${r.document}`);
  }
  console.log(`model ${response.model}, ${response.usage.documents} documents billed`);
});
